//! The real runtime: Apple's private in-memory ANE compiler and evaluator,
//! driven through `ffi` exactly as ane-reference §1.3 lists, with QoS 21.
//!
//! Compile: MIL bytes as NSData, the weights dictionary (never nil),
//! `_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist:`,
//! `_ANEInMemoryModel inMemoryModelWithDescriptor:`, the temp directory
//! `NSTemporaryDirectory()/<hexStringIdentifier>/` pre-populated (unique per
//! model thanks to the instance tag, see `files`), `compileWithQoS:` and
//! `loadWithQoS:` (one retry after 100 ms, as the reference's bridge does).
//! Evaluate: `_ANERequest` over `_ANEIOSurfaceObject`s, `evaluateWithQoS:`.
//! Every error names its step and carries the NSError description.
//! Nothing here is testable without a Mac; the logic it relies on is in
//! `surface`, `files` and `budget`, tested everywhere.

use std::path::PathBuf;
use std::rc::Rc;

use super::budget;
use super::ffi::{Class, Framework, Object, Surface};
use super::files::{ModelDir, ModelFiles};
use super::probe::examine;
use super::surface::SurfaceLayout;
use super::{AneBackend, Runtime};
use crate::Result;

/// The ANE backend over the private runtime, with the compile budget from the
/// environment, and the device family (`_ANEDeviceInfo`) or "unknown family".
pub fn open() -> Result<(AneBackend<PrivateRuntime>, String)> {
    let runtime = PrivateRuntime::open()?;
    let family = runtime
        .device_family()
        .unwrap_or_else(|| "unknown family".into());
    Ok((
        AneBackend::new(runtime, budget::CompileBudget::from_env()?),
        family,
    ))
}

/// [`open`], then probe what the training kernels need ([`examine`]); any
/// refusal is the reason not to use the ANE (step "probe").
pub fn open_probed() -> Result<(AneBackend<PrivateRuntime>, String)> {
    let (mut backend, family) = open()?;
    if let Some(reason) = examine(&mut backend).training_refusal() {
        return Err(crate::Error::Backend {
            backend: "ane",
            step: "probe",
            msg: reason,
        });
    }
    Ok((backend, family))
}

/// QoS used for every call (ane-reference §1.6).
pub const DEFAULT_QOS: u32 = 21;

/// The four classes every production path needs (§1.1).
pub const REQUIRED_CLASSES: [&str; 4] = [
    "_ANEInMemoryModelDescriptor",
    "_ANEInMemoryModel",
    "_ANERequest",
    "_ANEIOSurfaceObject",
];

struct Classes {
    descriptor: Class,
    model: Class,
    request: Class,
    surface_object: Class,
}

/// A compiled and loaded `_ANEInMemoryModel` and its temp directory.
pub struct PrivateModel {
    model: Object,
    _dir: ModelDir,
}

/// A retained `_ANERequest` (it retains its `_ANEIOSurfaceObject`s).
pub struct PrivateRequest {
    request: Object,
}

/// The runtime over `AppleNeuralEngine.framework`.
pub struct PrivateRuntime {
    framework: Rc<Framework>,
    classes: Classes,
    qos: u32,
    temp_root: PathBuf,
}

impl PrivateRuntime {
    /// Load the framework and look up the four classes. On anything but macOS
    /// on Apple silicon: "ane backend: dlopen: ANE unavailable: ...".
    pub fn open() -> Result<PrivateRuntime> {
        let framework = Framework::open()?;
        let classes = Classes {
            descriptor: framework.class(REQUIRED_CLASSES[0])?,
            model: framework.class(REQUIRED_CLASSES[1])?,
            request: framework.class(REQUIRED_CLASSES[2])?,
            surface_object: framework.class(REQUIRED_CLASSES[3])?,
        };
        let temp_root = PathBuf::from(framework.with_pool(|| framework.temporary_directory()));
        Ok(PrivateRuntime {
            framework,
            classes,
            qos: DEFAULT_QOS,
            temp_root,
        })
    }

    /// `+[_ANEDeviceInfo aneSubType]` (e.g. "H16G"), where the class and method exist.
    pub fn device_family(&self) -> Option<String> {
        let fw = &self.framework;
        fw.with_pool(|| {
            let class = fw.class("_ANEDeviceInfo").ok()?;
            fw.class_send0(class, "aneSubType").map(|s| fw.text(s))
        })
    }

    /// Which optional classes load (for `doctor`).
    pub fn has_class(&self, name: &str) -> bool {
        self.framework.class(name).is_ok()
    }
}

impl Runtime for PrivateRuntime {
    type Model = PrivateModel;
    type Surface = Rc<Surface>;
    type Request = PrivateRequest;

    fn name(&self) -> &'static str {
        "ane"
    }

    fn compiles(&self) -> usize {
        budget::process_compiles()
    }

    fn load(&mut self, files: &ModelFiles) -> Result<PrivateModel> {
        let fw = &self.framework;
        let qos = self.qos;
        fw.with_pool(|| {
            let mil = fw.data(files.mil.as_bytes())?;
            let mut entries = Vec::with_capacity(files.weights.len());
            for w in &files.weights {
                let offset = fw.number(w.offset)?;
                let data = fw.data(&w.data)?;
                let entry =
                    fw.dictionary(&[(fw.string("offset")?, offset), (fw.string("data")?, data)])?;
                entries.push((fw.string(&w.key)?, entry));
            }
            let weights = fw.dictionary(&entries)?;
            let descriptor = fw.descriptor(self.classes.descriptor, mil, weights)?;
            let model = fw.retain(fw.in_memory_model(self.classes.model, descriptor)?);
            let name = fw.hex_identifier(&model)?;
            let dir = ModelDir::create(&self.temp_root, &name, files)?;
            fw.qos_options_call(&model, "compileWithQoS:options:error:", "compile", qos)?;
            budget::record_compile();
            if fw
                .qos_options_call(&model, "loadWithQoS:options:error:", "load", qos)
                .is_err()
            {
                // The reference's bridge retries once "for ANE slot reclamation".
                std::thread::sleep(std::time::Duration::from_millis(100));
                fw.qos_options_call(&model, "loadWithQoS:options:error:", "load", qos)?;
            }
            Ok(PrivateModel { model, _dir: dir })
        })
    }

    fn surface(&mut self, layout: &SurfaceLayout) -> Result<Rc<Surface>> {
        let values = layout.properties().map(|(_, v)| v);
        let surface = self.framework.create_surface(values, layout.bytes())?;
        // IOSurface memory is not guaranteed to start zeroed.
        surface.lock_mut()?.bytes_mut().fill(0);
        Ok(Rc::new(surface))
    }

    fn write_surface(
        &self,
        surface: &Rc<Surface>,
        f: &mut dyn FnMut(&mut [u8]) -> Result<()>,
    ) -> Result<()> {
        let mut lock = surface.lock_mut()?;
        f(lock.bytes_mut())
    }

    fn read_surface(
        &self,
        surface: &Rc<Surface>,
        f: &mut dyn FnMut(&[u8]) -> Result<()>,
    ) -> Result<()> {
        let lock = surface.lock_read()?;
        f(lock.bytes())
    }

    fn request(
        &mut self,
        _model: &PrivateModel,
        inputs: &[&Rc<Surface>],
        outputs: &[&Rc<Surface>],
    ) -> Result<PrivateRequest> {
        let fw = &self.framework;
        fw.with_pool(|| {
            let wrap = |surfaces: &[&Rc<Surface>]| -> Result<(_, _)> {
                let mut objects = Vec::new();
                let mut indices = Vec::new();
                for (i, s) in surfaces.iter().enumerate() {
                    objects.push(fw.surface_object(self.classes.surface_object, s)?);
                    indices.push(fw.number(i as i32)?);
                }
                Ok((fw.array(&objects)?, fw.array(&indices)?))
            };
            let (ins, in_idx) = wrap(inputs)?;
            let (outs, out_idx) = wrap(outputs)?;
            let request = fw.request(self.classes.request, ins, in_idx, outs, out_idx)?;
            Ok(PrivateRequest {
                request: fw.retain(request),
            })
        })
    }

    fn evaluate(&mut self, model: &PrivateModel, request: &PrivateRequest) -> Result<()> {
        let fw = &self.framework;
        fw.with_pool(|| fw.evaluate(&model.model, &request.request, self.qos))
    }

    fn unload(&mut self, model: PrivateModel) -> Result<()> {
        let fw = &self.framework;
        // The directory goes with `model` whatever unload says.
        fw.with_pool(|| fw.unload(&model.model, self.qos))
    }
}
