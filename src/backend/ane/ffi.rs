//! Every call into the operating system the ANE backend makes, and the only
//! code in the crate with `unsafe`: the Objective-C runtime (`objc_getClass`,
//! `sel_registerName`, `objc_msgSend` cast to the exact signature of each call,
//! retain/release, autorelease pools), the few Foundation objects the private
//! API takes (NSData, NSString, NSNumber, NSDictionary, NSArray, NSError),
//! IOSurface (create with the six properties, lock/unlock, base address, alloc
//! size) and `dlopen` of `AppleNeuralEngine.framework`; and [`IoReport`],
//! the energy counters of `libIOReport` (no root needed).
//!
//! Symbols are resolved at run time with `dlopen`/`dlsym` (libloading), so this
//! file compiles on every platform; [`Framework::open`] fails cleanly where
//! there is no macOS. Nothing here knows about MIL, packages or training: the
//! selectors and argument types follow ane-reference §1.3 and §2, and the
//! safe wrappers ([`Object`], [`Surface`], [`SurfaceLock`]) own what they
//! retain. Never called concurrently: one thread drives one [`Framework`].
#![allow(unsafe_code)]

use std::ffi::{CStr, CString, c_char, c_void};
use std::rc::Rc;

use libloading::Library;

use crate::{Error, Result};

/// The private framework holding the `_ANE*` classes.
pub const ANE_FRAMEWORK: &str =
    "/System/Library/PrivateFrameworks/AppleNeuralEngine.framework/AppleNeuralEngine";
const LIBOBJC: &str = "/usr/lib/libobjc.A.dylib";
const FOUNDATION: &str = "/System/Library/Frameworks/Foundation.framework/Foundation";
const IOSURFACE: &str = "/System/Library/Frameworks/IOSurface.framework/IOSurface";
const COREFOUNDATION: &str = "/System/Library/Frameworks/CoreFoundation.framework/CoreFoundation";

/// `kIOSurfaceLockReadOnly` (IOSurfaceTypes.h).
const LOCK_READ_ONLY: u32 = 1;

type Id = *mut c_void;
type Sel = *mut c_void;

fn error(step: &'static str, msg: impl Into<String>) -> Error {
    Error::Backend {
        backend: "ane",
        step,
        msg: msg.into(),
    }
}

/// Why the ANE cannot be used on this machine, judged without loading anything;
/// `None` on macOS on Apple silicon.
pub fn platform_unavailable_reason() -> Option<String> {
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    if os != "macos" {
        Some(format!(
            "ANE unavailable: not macOS (this is {os} on {arch}); the Apple Neural Engine needs macOS on Apple silicon"
        ))
    } else if arch != "aarch64" {
        Some(format!(
            "ANE unavailable: not Apple silicon (this is macOS on {arch})"
        ))
    } else {
        None
    }
}

/// The loaded libraries and the function pointers taken from them.
pub struct Framework {
    get_class: unsafe extern "C" fn(*const c_char) -> Id,
    register_sel: unsafe extern "C" fn(*const c_char) -> Sel,
    /// `objc_msgSend`, never called through this type: cast per call site.
    msg_send: unsafe extern "C" fn(),
    retain: unsafe extern "C" fn(Id) -> Id,
    release: unsafe extern "C" fn(Id),
    pool_push: unsafe extern "C" fn() -> *mut c_void,
    pool_pop: unsafe extern "C" fn(*mut c_void),
    temporary_directory: unsafe extern "C" fn() -> Id,
    cf_release: unsafe extern "C" fn(Id),
    surface_create: unsafe extern "C" fn(Id) -> Id,
    surface_lock: unsafe extern "C" fn(Id, u32, *mut u32) -> i32,
    surface_unlock: unsafe extern "C" fn(Id, u32, *mut u32) -> i32,
    surface_base_address: unsafe extern "C" fn(Id) -> *mut c_void,
    surface_alloc_size: unsafe extern "C" fn(Id) -> usize,
    /// The `CFStringRef` values of the six property keys, in
    /// [`super::surface::SurfaceProperty::ALL`] order.
    surface_keys: [Id; 6],
    /// Kept loaded for as long as the pointers above are used.
    _libraries: Vec<Library>,
}

fn open_library(path: &str) -> Result<Library> {
    // SAFETY: loading a system library runs its initialisers; these are Apple's
    // own frameworks, loaded the way every Objective-C program loads them.
    unsafe { Library::new(path) }.map_err(|e| error("dlopen", format!("{path}: {e}")))
}

/// Copy a function pointer of type `T` out of `lib`.
fn symbol<T: Copy>(lib: &Library, name: &str) -> Result<T> {
    let cname = format!("{name}\0");
    // SAFETY: each call site names a C function whose prototype (from Apple's
    // public headers) is the `T` it asks for.
    let sym = unsafe { lib.get::<T>(cname.as_bytes()) }
        .map_err(|e| error("dlsym", format!("{name}: {e}")))?;
    Ok(*sym)
}

/// Read a `const CFStringRef` data symbol (e.g. `kIOSurfaceWidth`).
fn string_constant(lib: &Library, name: &str) -> Result<Id> {
    let cname = format!("{name}\0");
    // SAFETY: the symbol is an exported `const CFStringRef` variable; `get`
    // returns its address, which we read once. The string is immortal.
    unsafe {
        let sym = lib
            .get::<*const Id>(cname.as_bytes())
            .map_err(|e| error("dlsym", format!("{name}: {e}")))?;
        let address: *const Id = *sym;
        if address.is_null() {
            return Err(error("dlsym", format!("{name} is null")));
        }
        Ok(*address)
    }
}

impl Framework {
    /// Load the Objective-C runtime, Foundation, CoreFoundation, IOSurface and
    /// `AppleNeuralEngine.framework`. Errors name the library or symbol; on a
    /// machine that is not macOS on Apple silicon: "ANE unavailable: ...".
    pub fn open() -> Result<Rc<Framework>> {
        if let Some(reason) = platform_unavailable_reason() {
            return Err(error("dlopen", reason));
        }
        let objc = open_library(LIBOBJC)?;
        let foundation = open_library(FOUNDATION)?;
        let core_foundation = open_library(COREFOUNDATION)?;
        let iosurface = open_library(IOSURFACE)?;
        let ane = open_library(ANE_FRAMEWORK)?;
        let keys = super::surface::SurfaceProperty::ALL.map(|p| p.key_symbol());
        let surface_keys = [
            string_constant(&iosurface, keys[0])?,
            string_constant(&iosurface, keys[1])?,
            string_constant(&iosurface, keys[2])?,
            string_constant(&iosurface, keys[3])?,
            string_constant(&iosurface, keys[4])?,
            string_constant(&iosurface, keys[5])?,
        ];
        Ok(Rc::new(Framework {
            get_class: symbol(&objc, "objc_getClass")?,
            register_sel: symbol(&objc, "sel_registerName")?,
            msg_send: symbol(&objc, "objc_msgSend")?,
            retain: symbol(&objc, "objc_retain")?,
            release: symbol(&objc, "objc_release")?,
            pool_push: symbol(&objc, "objc_autoreleasePoolPush")?,
            pool_pop: symbol(&objc, "objc_autoreleasePoolPop")?,
            temporary_directory: symbol(&foundation, "NSTemporaryDirectory")?,
            cf_release: symbol(&core_foundation, "CFRelease")?,
            surface_create: symbol(&iosurface, "IOSurfaceCreate")?,
            surface_lock: symbol(&iosurface, "IOSurfaceLock")?,
            surface_unlock: symbol(&iosurface, "IOSurfaceUnlock")?,
            surface_base_address: symbol(&iosurface, "IOSurfaceGetBaseAddress")?,
            surface_alloc_size: symbol(&iosurface, "IOSurfaceGetAllocSize")?,
            surface_keys,
            _libraries: vec![objc, foundation, core_foundation, iosurface, ane],
        }))
    }

    /// Run `f` inside an autorelease pool: objects returned autoreleased by
    /// Foundation and the private API live until `f` returns.
    pub fn with_pool<T>(&self, f: impl FnOnce() -> T) -> T {
        // SAFETY: push/pop are balanced around `f`; the pool is thread-local.
        let pool = unsafe { (self.pool_push)() };
        let out = f();
        // SAFETY: `pool` is the token returned by the matching push.
        unsafe { (self.pool_pop)(pool) };
        out
    }

    /// `objc_getClass(name)`; step "class lookup" when the class does not exist.
    pub fn class(&self, name: &str) -> Result<Class> {
        let cname = CString::new(name).expect("class names have no NUL");
        // SAFETY: `cname` is a valid C string; objc_getClass returns nil or a class.
        let ptr = unsafe { (self.get_class)(cname.as_ptr()) };
        if ptr.is_null() {
            return Err(error(
                "class lookup",
                format!("class {name} not found (AppleNeuralEngine.framework changed?)"),
            ));
        }
        Ok(Class { ptr })
    }

    fn sel(&self, name: &str) -> Sel {
        let cname = CString::new(name).expect("selector names have no NUL");
        // SAFETY: `cname` is a valid C string; selectors are interned forever.
        unsafe { (self.register_sel)(cname.as_ptr()) }
    }

    /// `[receiver respondsToSelector:sel]`, to check a selector before casting a call to it.
    fn responds(&self, receiver: Id, selector: &str) -> bool {
        let sel = self.sel(selector);
        // SAFETY: `respondsToSelector:` is `BOOL (id, SEL, SEL)` on every NSObject.
        let f: unsafe extern "C" fn(Id, Sel, Sel) -> i8 = unsafe {
            std::mem::transmute::<unsafe extern "C" fn(), unsafe extern "C" fn(Id, Sel, Sel) -> i8>(
                self.msg_send,
            )
        };
        // SAFETY: `receiver` is a live object or class.
        unsafe { f(receiver, self.sel("respondsToSelector:"), sel) != 0 }
    }

    /// `id (*)(id, SEL)`.
    fn send0(&self, receiver: Id, selector: &str) -> Id {
        // SAFETY: the selector named by every caller takes no argument and returns an object.
        unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel) -> Id,
            >(self.msg_send);
            f(receiver, self.sel(selector))
        }
    }

    /// `id (*)(id, SEL, id)`.
    fn send1(&self, receiver: Id, selector: &str, a: Id) -> Id {
        // SAFETY: the selector named by every caller takes one object and returns an object.
        unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, Id) -> Id,
            >(self.msg_send);
            f(receiver, self.sel(selector), a)
        }
    }

    /// `id (*)(id, SEL, int)`: `+[NSNumber numberWithInt:]`, i.e. `@N`.
    pub fn number(&self, value: i32) -> Result<Id> {
        let class = self.class("NSNumber")?;
        // SAFETY: `numberWithInt:` is `id (Class, SEL, int)`.
        let n = unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, i32) -> Id,
            >(self.msg_send);
            f(class.ptr, self.sel("numberWithInt:"), value)
        };
        non_nil(n, "descriptor", "NSNumber numberWithInt:")
    }

    /// An autoreleased NSData copy of `bytes` (`dataWithBytes:length:`).
    pub fn data(&self, bytes: &[u8]) -> Result<Id> {
        let class = self.class("NSData")?;
        // SAFETY: `dataWithBytes:length:` is `id (Class, SEL, const void*, NSUInteger)`
        // and copies `len` bytes from a pointer valid for that many.
        let d = unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, *const c_void, usize) -> Id,
            >(self.msg_send);
            f(
                class.ptr,
                self.sel("dataWithBytes:length:"),
                bytes.as_ptr().cast(),
                bytes.len(),
            )
        };
        non_nil(d, "descriptor", "NSData dataWithBytes:length:")
    }

    /// An autoreleased NSString from UTF-8 text (`stringWithUTF8String:`).
    pub fn string(&self, text: &str) -> Result<Id> {
        let class = self.class("NSString")?;
        let c = CString::new(text)
            .map_err(|_| error("descriptor", format!("string {text:?} contains NUL")))?;
        // SAFETY: `stringWithUTF8String:` is `id (Class, SEL, const char*)`; `c` is valid.
        let s = unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, *const c_char) -> Id,
            >(self.msg_send);
            f(class.ptr, self.sel("stringWithUTF8String:"), c.as_ptr())
        };
        non_nil(s, "descriptor", "NSString stringWithUTF8String:")
    }

    /// The UTF-8 text of an NSString (or of any object's `description`).
    pub fn text(&self, object: Id) -> String {
        if object.is_null() {
            return "(nil)".into();
        }
        let string = self.send0(object, "description");
        if string.is_null() {
            return "(no description)".into();
        }
        // SAFETY: `UTF8String` is `const char* (id, SEL)`; the buffer lives as long
        // as the string, which the enclosing autorelease pool keeps alive while we copy.
        unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel) -> *const c_char,
            >(self.msg_send);
            let p = f(string, self.sel("UTF8String"));
            if p.is_null() {
                return "(not UTF-8)".into();
            }
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    }

    /// An autoreleased NSArray of `objects` (`arrayWithObjects:count:`).
    pub fn array(&self, objects: &[Id]) -> Result<Id> {
        let class = self.class("NSArray")?;
        // SAFETY: `arrayWithObjects:count:` is `id (Class, SEL, const id*, NSUInteger)`;
        // the pointer is valid for `len` non-nil objects (the array retains them).
        let a = unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, *const Id, usize) -> Id,
            >(self.msg_send);
            f(
                class.ptr,
                self.sel("arrayWithObjects:count:"),
                objects.as_ptr(),
                objects.len(),
            )
        };
        non_nil(a, "descriptor", "NSArray arrayWithObjects:count:")
    }

    /// An autoreleased NSDictionary (`dictionaryWithObjects:forKeys:count:`);
    /// empty (never nil) when `entries` is empty.
    pub fn dictionary(&self, entries: &[(Id, Id)]) -> Result<Id> {
        let class = self.class("NSDictionary")?;
        let keys: Vec<Id> = entries.iter().map(|e| e.0).collect();
        let values: Vec<Id> = entries.iter().map(|e| e.1).collect();
        // SAFETY: `dictionaryWithObjects:forKeys:count:` is
        // `id (Class, SEL, const id*, const id*, NSUInteger)`; both arrays hold `len`
        // non-nil objects (keys are copied, values retained).
        let d = unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, *const Id, *const Id, usize) -> Id,
            >(self.msg_send);
            f(
                class.ptr,
                self.sel("dictionaryWithObjects:forKeys:count:"),
                values.as_ptr(),
                keys.as_ptr(),
                keys.len(),
            )
        };
        non_nil(
            d,
            "descriptor",
            "NSDictionary dictionaryWithObjects:forKeys:count:",
        )
    }

    /// `NSTemporaryDirectory()`, where the in-memory model's files go.
    pub fn temporary_directory(&self) -> String {
        // SAFETY: NSTemporaryDirectory takes nothing and returns an autoreleased NSString.
        let s = unsafe { (self.temporary_directory)() };
        self.text(s)
    }

    /// Retain `ptr` (not nil) into an owned [`Object`].
    pub fn retain(self: &Rc<Self>, ptr: Id) -> Object {
        // SAFETY: `ptr` is a live object (callers check for nil first).
        unsafe { (self.retain)(ptr) };
        Object {
            framework: Rc::clone(self),
            ptr,
        }
    }

    /// `+[class selector]` for a class method of type `id (Class, SEL)`.
    pub fn class_send0(&self, class: Class, selector: &str) -> Option<Id> {
        if !self.responds(class.ptr, selector) {
            return None;
        }
        let out = self.send0(class.ptr, selector);
        (!out.is_null()).then_some(out)
    }

    /// `+[_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist:]`,
    /// cast `id (Class, SEL, id, id, id)`, options nil.
    pub fn descriptor(&self, class: Class, mil: Id, weights: Id) -> Result<Id> {
        // SAFETY: the selector's signature is `id (Class, SEL, NSData*, NSDictionary*, id)`
        // (ane-reference §1.3 step 1); the arguments are live objects or nil.
        let d = unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, Id, Id, Id) -> Id,
            >(self.msg_send);
            f(
                class.ptr,
                self.sel("modelWithMILText:weights:optionsPlist:"),
                mil,
                weights,
                std::ptr::null_mut(),
            )
        };
        non_nil(
            d,
            "descriptor",
            "_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist: returned nil",
        )
    }

    /// `+[_ANEInMemoryModel inMemoryModelWithDescriptor:]`, cast `id (Class, SEL, id)`.
    pub fn in_memory_model(&self, class: Class, descriptor: Id) -> Result<Id> {
        let m = self.send1(class.ptr, "inMemoryModelWithDescriptor:", descriptor);
        non_nil(
            m,
            "model",
            "_ANEInMemoryModel inMemoryModelWithDescriptor: returned nil",
        )
    }

    /// `-[model hexStringIdentifier]` as text.
    pub fn hex_identifier(&self, model: &Object) -> Result<String> {
        let s = self.send0(model.ptr, "hexStringIdentifier");
        non_nil(s, "model", "hexStringIdentifier returned nil")?;
        Ok(self.text(s))
    }

    /// `-compileWithQoS:options:error:` or `-loadWithQoS:options:error:`, cast
    /// `BOOL (id, SEL, unsigned int, id, NSError**)`, options `@{}`. The error
    /// text is the NSError's description.
    pub fn qos_options_call(
        &self,
        model: &Object,
        selector: &'static str,
        step: &'static str,
        qos: u32,
    ) -> Result<()> {
        let options = self.dictionary(&[])?;
        let mut err: Id = std::ptr::null_mut();
        // SAFETY: both selectors have the signature above (ane-reference §1.3
        // steps 5-6); `err` is a valid out-pointer for an autoreleased NSError.
        let ok = unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, u32, Id, *mut Id) -> i8,
            >(self.msg_send);
            f(model.ptr, self.sel(selector), qos, options, &mut err)
        };
        self.check(ok, err, step, selector)
    }

    /// `-evaluateWithQoS:options:request:error:`, cast
    /// `BOOL (id, SEL, unsigned int, id, id, NSError**)`, options `@{}`.
    pub fn evaluate(&self, model: &Object, request: &Object, qos: u32) -> Result<()> {
        let options = self.dictionary(&[])?;
        let mut err: Id = std::ptr::null_mut();
        // SAFETY: signature from ane-reference §1.3 step 10; all objects live.
        let ok = unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, u32, Id, Id, *mut Id) -> i8,
            >(self.msg_send);
            f(
                model.ptr,
                self.sel("evaluateWithQoS:options:request:error:"),
                qos,
                options,
                request.ptr,
                &mut err,
            )
        };
        self.check(
            ok,
            err,
            "evaluate",
            "evaluateWithQoS:options:request:error:",
        )
    }

    /// `-unloadWithQoS:error:`, cast `BOOL (id, SEL, unsigned int, NSError**)`.
    pub fn unload(&self, model: &Object, qos: u32) -> Result<()> {
        let mut err: Id = std::ptr::null_mut();
        // SAFETY: signature from ane-reference §1.3 step 11.
        let ok = unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, u32, *mut Id) -> i8,
            >(self.msg_send);
            f(model.ptr, self.sel("unloadWithQoS:error:"), qos, &mut err)
        };
        self.check(ok, err, "unload", "unloadWithQoS:error:")
    }

    fn check(&self, ok: i8, err: Id, step: &'static str, selector: &str) -> Result<()> {
        if ok != 0 {
            return Ok(());
        }
        Err(error(
            step,
            format!("{selector} failed: {}", self.text(err)),
        ))
    }

    /// `+[_ANEIOSurfaceObject objectWithIOSurface:]`, cast `id (Class, SEL, IOSurfaceRef)`.
    pub fn surface_object(&self, class: Class, surface: &Surface) -> Result<Id> {
        let o = self.send1(class.ptr, "objectWithIOSurface:", surface.ptr);
        non_nil(
            o,
            "request",
            "_ANEIOSurfaceObject objectWithIOSurface: returned nil",
        )
    }

    /// `+[_ANERequest requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:]`,
    /// cast `id (Class, SEL, id x 7)`; weightsBuffer and perfStats nil, procedureIndex `@0`.
    pub fn request(
        &self,
        class: Class,
        inputs: Id,
        input_indices: Id,
        outputs: Id,
        output_indices: Id,
    ) -> Result<Id> {
        let procedure = self.number(0)?;
        let nil: Id = std::ptr::null_mut();
        // SAFETY: signature from ane-reference §1.3 step 9: seven object arguments.
        let r = unsafe {
            let f = std::mem::transmute::<
                unsafe extern "C" fn(),
                unsafe extern "C" fn(Id, Sel, Id, Id, Id, Id, Id, Id, Id) -> Id,
            >(self.msg_send);
            f(
                class.ptr,
                self.sel(
                    "requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:",
                ),
                inputs,
                input_indices,
                outputs,
                output_indices,
                nil,
                nil,
                procedure,
            )
        };
        non_nil(r, "request", "_ANERequest requestWith... returned nil")
    }

    /// `IOSurfaceCreate` with the six properties of `values` (in
    /// [`super::surface::SurfaceProperty::ALL`] order), checked against the alloc size.
    pub fn create_surface(self: &Rc<Self>, values: [usize; 6], bytes: usize) -> Result<Surface> {
        let surface = self.with_pool(|| -> Result<Id> {
            let class = self.class("NSNumber")?;
            let mut entries = Vec::with_capacity(6);
            for (key, value) in self.surface_keys.iter().zip(values) {
                // SAFETY: `numberWithUnsignedLong:` is `id (Class, SEL, unsigned long)`.
                let n = unsafe {
                    let f = std::mem::transmute::<
                        unsafe extern "C" fn(),
                        unsafe extern "C" fn(Id, Sel, usize) -> Id,
                    >(self.msg_send);
                    f(class.ptr, self.sel("numberWithUnsignedLong:"), value)
                };
                entries.push((*key, non_nil(n, "surface", "NSNumber")?));
            }
            let properties = self.dictionary(&entries)?;
            // SAFETY: IOSurfaceCreate takes a CFDictionaryRef (NSDictionary is
            // toll-free bridged) and returns a +1 IOSurfaceRef or NULL.
            let s = unsafe { (self.surface_create)(properties) };
            non_nil(
                s,
                "surface",
                format!("IOSurfaceCreate({bytes} bytes) returned NULL"),
            )
        })?;
        let surface = Surface {
            framework: Rc::clone(self),
            ptr: surface,
            bytes,
        };
        // SAFETY: `surface.ptr` is the live surface just created.
        let alloc = unsafe { (self.surface_alloc_size)(surface.ptr) };
        if alloc < bytes {
            return Err(error(
                "surface",
                format!("IOSurface allocated {alloc} bytes, asked for {bytes}"),
            ));
        }
        Ok(surface)
    }
}

fn non_nil(ptr: Id, step: &'static str, what: impl Into<String>) -> Result<Id> {
    if ptr.is_null() {
        Err(error(step, what))
    } else {
        Ok(ptr)
    }
}

/// An Objective-C class pointer (classes are never released).
#[derive(Clone, Copy)]
pub struct Class {
    ptr: Id,
}

/// A retained Objective-C object, released on drop.
pub struct Object {
    framework: Rc<Framework>,
    ptr: Id,
}

impl Drop for Object {
    fn drop(&mut self) {
        // SAFETY: we hold exactly one retain on `ptr`, taken in `Framework::retain`.
        unsafe { (self.framework.release)(self.ptr) }
    }
}

/// An IOSurface of `bytes` bytes, released (`CFRelease`) on drop.
pub struct Surface {
    framework: Rc<Framework>,
    ptr: Id,
    bytes: usize,
}

impl Surface {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Lock for writing (`IOSurfaceLock(s, 0, NULL)`), unlocked when the guard drops.
    pub fn lock_mut(&self) -> Result<SurfaceLock<'_>> {
        self.lock(0)
    }

    /// Lock read-only (`kIOSurfaceLockReadOnly`).
    pub fn lock_read(&self) -> Result<SurfaceLock<'_>> {
        self.lock(LOCK_READ_ONLY)
    }

    fn lock(&self, options: u32) -> Result<SurfaceLock<'_>> {
        // SAFETY: `ptr` is a live surface; a NULL seed pointer is allowed.
        let rc = unsafe { (self.framework.surface_lock)(self.ptr, options, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(error("surface", format!("IOSurfaceLock returned {rc:#x}")));
        }
        // SAFETY: the surface is locked, so its base address is stable.
        let base = unsafe { (self.framework.surface_base_address)(self.ptr) };
        if base.is_null() {
            // SAFETY: balance the lock we just took.
            unsafe { (self.framework.surface_unlock)(self.ptr, options, std::ptr::null_mut()) };
            return Err(error("surface", "IOSurfaceGetBaseAddress returned NULL"));
        }
        Ok(SurfaceLock {
            surface: self,
            options,
            base: base.cast(),
        })
    }
}

impl Drop for Surface {
    fn drop(&mut self) {
        // SAFETY: we own the +1 reference returned by IOSurfaceCreate.
        unsafe { (self.framework.cf_release)(self.ptr) }
    }
}

/// A locked surface; its memory is visible as bytes until the guard drops.
pub struct SurfaceLock<'s> {
    surface: &'s Surface,
    options: u32,
    base: *mut u8,
}

impl SurfaceLock<'_> {
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: while locked, `base` points to at least `bytes` bytes (checked
        // against IOSurfaceGetAllocSize at creation) that only this process touches.
        unsafe { std::slice::from_raw_parts(self.base, self.surface.bytes) }
    }

    /// Panics if the surface was locked read-only.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        assert_eq!(self.options, 0, "surface locked read-only");
        // SAFETY: as in `bytes`, and `&mut self` makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.base, self.surface.bytes) }
    }
}

impl Drop for SurfaceLock<'_> {
    fn drop(&mut self) {
        let fw = &self.surface.framework;
        // SAFETY: balances the lock taken in `Surface::lock` with the same options.
        unsafe { (fw.surface_unlock)(self.surface.ptr, self.options, std::ptr::null_mut()) };
    }
}

/// `libIOReport`, where macOS keeps its energy counters.
const IOREPORT: &str = "/usr/lib/libIOReport.dylib";
/// The IOReport group whose channels count joules per rail.
const ENERGY_GROUP: &str = "Energy Model";
/// `kCFStringEncodingUTF8`.
const UTF8: u32 = 0x0800_0100;

/// One channel of an energy delta: group, channel name, unit label and value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelValue {
    pub group: String,
    pub channel: String,
    pub unit: String,
    pub value: i64,
}

/// A subscription to IOReport's "Energy Model" channels (the counters that
/// `powermetrics` and `macmon` read; readable without root). Symbols are
/// taken with `dlopen` as for the framework, so this compiles everywhere and
/// [`IoReport::open`] fails cleanly off macOS. Prototypes follow the
/// reverse-engineered headers every IOReport reader uses (unverified by us).
pub struct IoReport {
    create_samples: unsafe extern "C" fn(Id, Id, Id) -> Id,
    create_samples_delta: unsafe extern "C" fn(Id, Id, Id) -> Id,
    channel_group: unsafe extern "C" fn(Id) -> Id,
    channel_name: unsafe extern "C" fn(Id) -> Id,
    unit_label: unsafe extern "C" fn(Id) -> Id,
    integer_value: unsafe extern "C" fn(Id, i32) -> i64,
    string_create: unsafe extern "C" fn(Id, *const c_char, u32) -> Id,
    string_get: unsafe extern "C" fn(Id, *mut c_char, isize, u32) -> u8,
    dictionary_get: unsafe extern "C" fn(Id, Id) -> Id,
    array_count: unsafe extern "C" fn(Id) -> isize,
    array_at: unsafe extern "C" fn(Id, isize) -> Id,
    cf_release: unsafe extern "C" fn(Id),
    /// The subscription and the channels it delivers (owned, +1).
    subscription: Id,
    channels: Id,
    _libraries: Vec<Library>,
}

// SAFETY: the CoreFoundation objects held (a subscription and an immutable
// channel dictionary) are only read, retained and released; CF allows that
// from any thread, and callers serialise access (`energy` keeps it in a Mutex).
unsafe impl Send for IoReport {}

/// One IOReport sample (a CFDictionary, +1), released on drop.
pub struct IoSample {
    ptr: Id,
    release: unsafe extern "C" fn(Id),
}

// SAFETY: a sample is an immutable CFDictionary that is only read and
// released, which CF allows from any thread.
unsafe impl Send for IoSample {}

impl Drop for IoSample {
    fn drop(&mut self) {
        // SAFETY: we own the +1 reference returned by IOReportCreateSamples.
        unsafe { (self.release)(self.ptr) }
    }
}

impl IoReport {
    /// Load `libIOReport` and CoreFoundation and subscribe to the "Energy
    /// Model" group. Off macOS: step "dlopen", "energy counters need macOS".
    pub fn open() -> Result<IoReport> {
        if std::env::consts::OS != "macos" {
            return Err(error(
                "dlopen",
                format!(
                    "energy counters need macOS (this is {})",
                    std::env::consts::OS
                ),
            ));
        }
        let ioreport = open_library(IOREPORT)?;
        let core_foundation = open_library(COREFOUNDATION)?;
        type CopyChannels = unsafe extern "C" fn(Id, Id, u64, u64, u64) -> Id;
        type Subscribe = unsafe extern "C" fn(Id, Id, *mut Id, u64, Id) -> Id;
        let copy_channels: CopyChannels = symbol(&ioreport, "IOReportCopyChannelsInGroup")?;
        let subscribe: Subscribe = symbol(&ioreport, "IOReportCreateSubscription")?;
        let mut report = IoReport {
            create_samples: symbol(&ioreport, "IOReportCreateSamples")?,
            create_samples_delta: symbol(&ioreport, "IOReportCreateSamplesDelta")?,
            channel_group: symbol(&ioreport, "IOReportChannelGetGroup")?,
            channel_name: symbol(&ioreport, "IOReportChannelGetChannelName")?,
            unit_label: symbol(&ioreport, "IOReportChannelGetUnitLabel")?,
            integer_value: symbol(&ioreport, "IOReportSimpleGetIntegerValue")?,
            string_create: symbol(&core_foundation, "CFStringCreateWithCString")?,
            string_get: symbol(&core_foundation, "CFStringGetCString")?,
            dictionary_get: symbol(&core_foundation, "CFDictionaryGetValue")?,
            array_count: symbol(&core_foundation, "CFArrayGetCount")?,
            array_at: symbol(&core_foundation, "CFArrayGetValueAtIndex")?,
            cf_release: symbol(&core_foundation, "CFRelease")?,
            subscription: std::ptr::null_mut(),
            channels: std::ptr::null_mut(),
            _libraries: Vec::new(),
        };
        let group = report.cf_string(ENERGY_GROUP)?;
        // SAFETY: `IOReportCopyChannelsInGroup(CFStringRef group, CFStringRef
        // subgroup, u64, u64, u64)` returns a +1 CFMutableDictionary or NULL;
        // `group` is a live CFString and a NULL subgroup means all of them.
        let wanted = unsafe { copy_channels(group, std::ptr::null_mut(), 0, 0, 0) };
        // SAFETY: `group` is the +1 string created above.
        unsafe { (report.cf_release)(group) };
        if wanted.is_null() {
            return Err(error("energy", "no \"Energy Model\" channels in IOReport"));
        }
        let mut subscribed: Id = std::ptr::null_mut();
        // SAFETY: `IOReportCreateSubscription(void*, CFMutableDictionaryRef
        // desired, CFMutableDictionaryRef* subscribed, u64, CFTypeRef)` returns
        // a +1 subscription and writes a +1 dictionary to the out-pointer.
        let subscription = unsafe {
            subscribe(
                std::ptr::null_mut(),
                wanted,
                &mut subscribed,
                0,
                std::ptr::null_mut(),
            )
        };
        // SAFETY: `wanted` is the +1 dictionary copied above, no longer needed.
        unsafe { (report.cf_release)(wanted) };
        if subscription.is_null() || subscribed.is_null() {
            return Err(error("energy", "IOReportCreateSubscription returned NULL"));
        }
        report.subscription = subscription;
        report.channels = subscribed;
        report._libraries = vec![ioreport, core_foundation];
        Ok(report)
    }

    /// A +1 CFString from `text`.
    fn cf_string(&self, text: &str) -> Result<Id> {
        let c = CString::new(text).map_err(|_| error("energy", "string with NUL"))?;
        // SAFETY: CFStringCreateWithCString(NULL allocator, valid C string, UTF-8).
        let s = unsafe { (self.string_create)(std::ptr::null_mut(), c.as_ptr(), UTF8) };
        non_nil(s, "energy", "CFStringCreateWithCString returned NULL")
    }

    /// The text of a CFString (empty for NULL).
    fn text(&self, s: Id) -> String {
        if s.is_null() {
            return String::new();
        }
        let mut buf = [0 as c_char; 256];
        // SAFETY: `s` is a live CFString; the buffer holds `len` bytes and
        // CFStringGetCString writes a NUL-terminated string or fails.
        let ok = unsafe { (self.string_get)(s, buf.as_mut_ptr(), buf.len() as isize, UTF8) };
        if ok == 0 {
            return String::new();
        }
        // SAFETY: on success the buffer holds a NUL-terminated string.
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned()
    }

    /// The current value of every subscribed counter.
    pub fn sample(&self) -> Result<IoSample> {
        // SAFETY: `IOReportCreateSamples(subscription, subscribed channels,
        // CFTypeRef)` returns a +1 CFDictionary or NULL; both objects are live.
        let ptr = unsafe {
            (self.create_samples)(self.subscription, self.channels, std::ptr::null_mut())
        };
        let ptr = non_nil(ptr, "energy", "IOReportCreateSamples returned NULL")?;
        Ok(IoSample {
            ptr,
            release: self.cf_release,
        })
    }

    /// Every channel's change from `earlier` to `later`.
    pub fn delta(&self, earlier: &IoSample, later: &IoSample) -> Result<Vec<ChannelValue>> {
        // SAFETY: `IOReportCreateSamplesDelta(CFDictionaryRef, CFDictionaryRef,
        // CFTypeRef)` returns a +1 CFDictionary or NULL; both samples are live.
        let delta =
            unsafe { (self.create_samples_delta)(earlier.ptr, later.ptr, std::ptr::null_mut()) };
        let delta = IoSample {
            ptr: non_nil(delta, "energy", "IOReportCreateSamplesDelta returned NULL")?,
            release: self.cf_release,
        };
        let key = self.cf_string("IOReportChannels")?;
        // SAFETY: a live dictionary and a live key; the value is borrowed
        // (Get rule) from `delta`, which outlives its use below.
        let items = unsafe { (self.dictionary_get)(delta.ptr, key) };
        // SAFETY: `key` is the +1 string created above.
        unsafe { (self.cf_release)(key) };
        if items.is_null() {
            return Ok(Vec::new());
        }
        // SAFETY: `items` is the CFArray of channel dictionaries in `delta`.
        let count = unsafe { (self.array_count)(items) };
        let mut values = Vec::with_capacity(count.max(0) as usize);
        for index in 0..count {
            // SAFETY: `index` is below the array's count; the item is borrowed.
            let item = unsafe { (self.array_at)(items, index) };
            if item.is_null() {
                continue;
            }
            // SAFETY: each item is an IOReport channel dictionary; the getters
            // return borrowed CFStrings (or NULL) and a plain integer.
            let (group, channel, unit, value) = unsafe {
                (
                    (self.channel_group)(item),
                    (self.channel_name)(item),
                    (self.unit_label)(item),
                    (self.integer_value)(item, 0),
                )
            };
            values.push(ChannelValue {
                group: self.text(group),
                channel: self.text(channel),
                unit: self.text(unit),
                value,
            });
        }
        Ok(values)
    }
}

impl Drop for IoReport {
    fn drop(&mut self) {
        for object in [self.subscription, self.channels] {
            if !object.is_null() {
                // SAFETY: both are the +1 objects IOReportCreateSubscription returned.
                unsafe { (self.cf_release)(object) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_counters_off_macos_name_the_reason() {
        if std::env::consts::OS != "macos" {
            let err = IoReport::open().err().expect("no IOReport here");
            assert!(
                err.to_string()
                    .starts_with("ane backend: dlopen: energy counters need macOS"),
                "{err}"
            );
        }
    }

    #[test]
    fn opening_off_apple_silicon_names_the_reason() {
        match platform_unavailable_reason() {
            Some(reason) => {
                let err = Framework::open().err().expect("cannot open here");
                let text = err.to_string();
                assert!(
                    text.starts_with("ane backend: dlopen: ANE unavailable: not "),
                    "{text}"
                );
                assert!(text.contains(&reason), "{text}");
            }
            None => {
                assert_eq!(std::env::consts::OS, "macos");
            }
        }
        if std::env::consts::OS == "linux" {
            assert!(platform_unavailable_reason().unwrap().contains("not macOS"));
        }
    }
}
