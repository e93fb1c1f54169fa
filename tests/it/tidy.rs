//! Tidy checks over the source tree (in the manner of rust-analyzer's
//! `tidy.rs`): the shape rules the compiler does not enforce, checked by every
//! `cargo test`.
//!
//! - No import cycle between the files of `src/`: nodes are files; there is an
//!   edge A -> B when A names an item defined in B, through a `use` or a
//!   qualified path (`crate::x::f`, `super::f`, `anemone::x::f` in the binary),
//!   following `pub use` re-exports to the file that defines the item. `mod`
//!   declarations and `pub use` re-exports are not edges; `#[cfg(test)]` code
//!   does not count; a file naming its own items is no edge. A cycle is printed
//!   with the names that make each edge, so the message says what to move.
//! - No function longer than [`MAX_FUNCTION_LINES`] lines in `src/train/` and
//!   `src/backend/cpu/`.
//! - The CLI parser (`clap`) is named only in `src/cli/`: the library does not know it.
//! - `unsafe` appears only in the files of [`UNSAFE_ALLOWED`].
//!
//! Sources are parsed with `syn`, so comments and strings never count. There is
//! no allow-list: a failure is fixed in the code. What the graph cannot see are
//! method calls (`x.f()` names no path); the trait they need is imported with
//! a `use`, which is an edge.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use proc_macro2::{TokenStream, TokenTree};
use syn::visit::Visit;

/// The longest function allowed in [`SHORT_FUNCTION_DIRS`], signature to closing brace.
const MAX_FUNCTION_LINES: usize = 120;
/// Directories whose functions must fit on a screen or two.
const SHORT_FUNCTION_DIRS: [&str; 2] = ["src/train/", "src/backend/cpu/"];
/// The only files that may hold `unsafe` code (ARCHITECTURE.md, invariant 3);
/// the memory-map module joins this list when it lands.
const UNSAFE_ALLOWED: [&str; 2] = ["src/backend/ane/ffi.rs", "src/mmap.rs"];
/// The only directory that may name the CLI parser crate.
const CLI_DIR: &str = "src/cli/";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir` (relative to the package root), sorted.
fn rust_files(dir: &str) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let mut paths = Vec::new();
    walk(&root().join(dir), &mut paths);
    let mut files: Vec<String> = paths
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(root()).unwrap();
            rel.to_string_lossy().replace('\\', "/")
        })
        .collect();
    files.sort();
    files
}

fn read_source(path: &str) -> Option<String> {
    std::fs::read_to_string(root().join(path)).ok()
}

fn parse(path: &str, text: &str) -> syn::File {
    syn::parse_file(text).unwrap_or_else(|e| panic!("{path}: cannot parse: {e}"))
}

// ---- the import graph --------------------------------------------------------

/// `#[cfg(test)]` (or `#[cfg(all(test, ..))]`): code that is not part of the build.
fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| {
        if !attr.path().is_ident("cfg") {
            return false;
        }
        let Ok(list) = attr.meta.require_list() else {
            return false;
        };
        let tokens = list.tokens.to_string().replace(' ', "");
        let all = tokens
            .strip_prefix("all(")
            .and_then(|t| t.strip_suffix(')'));
        tokens == "test" || all.is_some_and(|all| all.split(',').any(|part| part == "test"))
    })
}

/// One name brought into scope by a `use` (`None` for a glob, `use x::*`).
/// Private and `pub` imports alike resolve names; only a private `use` is an
/// edge of its file (see [`References`]).
#[derive(Clone, Debug)]
struct Import {
    name: Option<String>,
    path: Vec<String>,
}

/// The leaves of a `use` tree as imports.
fn imports(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Import>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            imports(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) if n.ident == "self" => out.push(Import {
            name: prefix.last().cloned(),
            path: prefix.clone(),
        }),
        syn::UseTree::Name(n) => {
            let mut path = prefix.clone();
            path.push(n.ident.to_string());
            out.push(Import {
                name: Some(n.ident.to_string()),
                path,
            });
        }
        syn::UseTree::Rename(r) => {
            let mut path = prefix.clone();
            if r.ident != "self" {
                path.push(r.ident.to_string());
            }
            out.push(Import {
                name: Some(r.rename.to_string()),
                path,
            });
        }
        syn::UseTree::Glob(_) => out.push(Import {
            name: None,
            path: prefix.clone(),
        }),
        syn::UseTree::Group(g) => {
            for item in &g.items {
                imports(item, prefix, out);
            }
        }
    }
}

/// A module: where it lives and what its scope holds.
#[derive(Debug, Default)]
struct Module {
    file: usize,
    parent: Option<usize>,
    /// The crate root this module belongs to.
    crate_root: usize,
    children: BTreeMap<String, usize>,
    /// Items defined here, each with its enum variants (empty for other items).
    items: BTreeMap<String, Vec<String>>,
    imports: Vec<Import>,
}

/// What a path names.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Named {
    Module(usize),
    /// An item `name` defined in file `file`.
    Item {
        file: usize,
        name: String,
    },
}

/// Files, modules and the edges between files.
struct ImportGraph {
    files: Vec<String>,
    /// The parsed files, in the order of `files`.
    asts: Vec<syn::File>,
    modules: Vec<Module>,
    /// The library's root module, which `anemone::` names in the binary.
    library_root: Option<usize>,
    /// (from file, to file) -> the item names that make the edge.
    edges: BTreeMap<(usize, usize), BTreeSet<String>>,
}

impl ImportGraph {
    /// The crate in `src/`: the library from `src/lib.rs`, the binary from `src/main.rs`.
    fn of_crate() -> ImportGraph {
        ImportGraph::build(&["src/lib.rs", "src/main.rs"], &read_source)
    }

    /// The graph of the crates rooted at `roots` (the first is the library),
    /// reading files through `source`.
    fn build(roots: &[&str], source: &dyn Fn(&str) -> Option<String>) -> ImportGraph {
        let mut graph = ImportGraph {
            files: Vec::new(),
            asts: Vec::new(),
            modules: Vec::new(),
            library_root: None,
            edges: BTreeMap::new(),
        };
        for (i, root) in roots.iter().enumerate() {
            let text = source(root).unwrap_or_else(|| panic!("{root}: missing"));
            let module = graph.add_file(root, &text, None);
            if i == 0 {
                graph.library_root = Some(module);
            }
            let file = graph.modules[module].file;
            let items = graph.asts[file].items.clone();
            graph.collect(module, &items, &child_dir(root), source);
        }
        for file in 0..graph.files.len() {
            let module = graph
                .modules
                .iter()
                .position(|m| m.file == file)
                .expect("every file is a module");
            let mut refs = References {
                modules: &graph.modules,
                module,
                found: Vec::new(),
            };
            refs.visit_file(&graph.asts[file]);
            for (module, path) in refs.found {
                if let Some(Named::Item { file: to, name }) = graph.resolve(module, &path, 0)
                    && to != file
                {
                    graph.edges.entry((file, to)).or_default().insert(name);
                }
            }
        }
        graph
    }

    /// A new file and its top module (a crate root when `parent` is `None`).
    fn add_file(&mut self, path: &str, text: &str, parent: Option<usize>) -> usize {
        self.files.push(path.to_string());
        self.asts.push(parse(path, text));
        let id = self.modules.len();
        let crate_root = parent.map_or(id, |p| self.modules[p].crate_root);
        self.modules.push(Module {
            file: self.files.len() - 1,
            parent,
            crate_root,
            ..Module::default()
        });
        id
    }

    /// Record the items, imports and child modules of `module`, whose child
    /// module files live in `dir`.
    fn collect(
        &mut self,
        module: usize,
        items: &[syn::Item],
        dir: &str,
        source: &dyn Fn(&str) -> Option<String>,
    ) {
        for item in items {
            if is_test_only(item_attrs(item)) {
                continue;
            }
            let mut nested = UseCollector::default();
            let name = match item {
                syn::Item::Mod(m) => {
                    let name = m.ident.to_string();
                    let child = match &m.content {
                        Some((_, items)) => {
                            let id = self.modules.len();
                            let parent = &self.modules[module];
                            self.modules.push(Module {
                                file: parent.file,
                                parent: Some(module),
                                crate_root: parent.crate_root,
                                ..Module::default()
                            });
                            self.collect(id, items, &format!("{dir}{name}/"), source);
                            id
                        }
                        None => {
                            let (path, text) =
                                [format!("{dir}{name}.rs"), format!("{dir}{name}/mod.rs")]
                                    .into_iter()
                                    .find_map(|p| source(&p).map(|t| (p, t)))
                                    .unwrap_or_else(|| {
                                        panic!("module `{name}` not found in {dir}")
                                    });
                            let id = self.add_file(&path, &text, Some(module));
                            let file = self.modules[id].file;
                            let items = self.asts[file].items.clone();
                            self.collect(id, &items, &child_dir(&path), source);
                            id
                        }
                    };
                    self.modules[module].children.insert(name, child);
                    continue;
                }
                syn::Item::Use(u) => {
                    imports(&u.tree, &mut Vec::new(), &mut self.modules[module].imports);
                    continue;
                }
                syn::Item::Fn(f) => {
                    nested.visit_item_fn(f);
                    Some(f.sig.ident.to_string())
                }
                syn::Item::Impl(i) => {
                    nested.visit_item_impl(i);
                    None
                }
                syn::Item::Trait(t) => {
                    nested.visit_item_trait(t);
                    Some(t.ident.to_string())
                }
                syn::Item::Const(c) => {
                    nested.visit_item_const(c);
                    Some(c.ident.to_string())
                }
                syn::Item::Static(s) => {
                    nested.visit_item_static(s);
                    Some(s.ident.to_string())
                }
                syn::Item::Struct(s) => Some(s.ident.to_string()),
                syn::Item::Union(u) => Some(u.ident.to_string()),
                syn::Item::Type(t) => Some(t.ident.to_string()),
                syn::Item::TraitAlias(t) => Some(t.ident.to_string()),
                syn::Item::Macro(m) => m.ident.as_ref().map(|i| i.to_string()),
                syn::Item::Enum(e) => {
                    let variants = e.variants.iter().map(|v| v.ident.to_string()).collect();
                    self.modules[module]
                        .items
                        .insert(e.ident.to_string(), variants);
                    continue;
                }
                _ => None,
            };
            if let Some(name) = name {
                self.modules[module].items.insert(name, Vec::new());
            }
            // `use` inside function bodies and impls counts for the module.
            self.modules[module].imports.extend(nested.found);
        }
    }

    /// What `path` names from `module` (`None`: outside the crate, a local
    /// or something this resolver does not follow).
    fn resolve(&self, module: usize, path: &[String], depth: usize) -> Option<Named> {
        if depth > 32 {
            return None;
        }
        let (first, rest) = path.split_first()?;
        let mut at = match first.as_str() {
            "crate" => Named::Module(self.modules[module].crate_root),
            "self" => Named::Module(module),
            "super" => Named::Module(self.modules[module].parent?),
            "anemone" if self.modules[module].crate_root != self.library_root? => {
                Named::Module(self.library_root?)
            }
            _ => self.lookup(module, first, !rest.is_empty(), depth)?,
        };
        for (i, segment) in rest.iter().enumerate() {
            let Named::Module(m) = at else {
                // An associated item or a variant: the path names its type.
                return Some(at);
            };
            at = match segment.as_str() {
                "super" => Named::Module(self.modules[m].parent?),
                "self" => Named::Module(m),
                _ => self.lookup(m, segment, i + 1 < rest.len(), depth)?,
            };
        }
        Some(at)
    }

    /// `name` in the scope of `module`: a child module, an item defined there
    /// or a name it imports (followed to where it is defined).
    fn lookup(&self, module: usize, name: &str, module_first: bool, depth: usize) -> Option<Named> {
        let m = &self.modules[module];
        let child = m.children.get(name).map(|&c| Named::Module(c));
        let item = m.items.contains_key(name).then(|| Named::Item {
            file: m.file,
            name: name.to_string(),
        });
        let imported = || {
            m.imports
                .iter()
                .find(|i| i.name.as_deref() == Some(name))
                .and_then(|i| self.resolve(module, &i.path, depth + 1))
        };
        // A path goes on through a module; it ends on an item (a module `open`
        // may sit beside a re-exported function `open`).
        let found = if module_first {
            child.or(item).or_else(imported)
        } else {
            item.or_else(imported).or(child)
        };
        if found.is_some() {
            return found;
        }
        for import in m.imports.iter().filter(|i| i.name.is_none()) {
            match self.resolve(module, &import.path, depth + 1) {
                Some(Named::Module(glob)) if glob != module => {
                    if let Some(found) = self.lookup(glob, name, module_first, depth + 1) {
                        return Some(found);
                    }
                }
                Some(Named::Item {
                    file,
                    name: enum_name,
                }) => {
                    let variants = self
                        .modules
                        .iter()
                        .filter(|m| m.file == file)
                        .find_map(|m| m.items.get(&enum_name));
                    if variants.is_some_and(|v| v.iter().any(|v| v == name)) {
                        return Some(Named::Item {
                            file,
                            name: enum_name,
                        });
                    }
                }
                _ => {}
            }
        }
        None
    }

    /// Every group of files that import each other (strongly connected
    /// components of more than one file), each as its files.
    fn cycles(&self) -> Vec<Vec<usize>> {
        let n = self.files.len();
        let mut next: Vec<Vec<usize>> = vec![Vec::new(); n];
        for &(from, to) in self.edges.keys() {
            next[from].push(to);
        }
        let mut tarjan = Tarjan {
            next: &next,
            index: vec![None; n],
            low: vec![0; n],
            on_stack: vec![false; n],
            stack: Vec::new(),
            counter: 0,
            components: Vec::new(),
        };
        for v in 0..n {
            if tarjan.index[v].is_none() {
                tarjan.visit(v);
            }
        }
        let mut groups: Vec<Vec<usize>> = tarjan
            .components
            .into_iter()
            .filter(|c| c.len() > 1)
            .map(|mut c| {
                c.sort_by(|&a, &b| self.files[a].cmp(&self.files[b]));
                c
            })
            .collect();
        groups.sort_by(|a, b| self.files[a[0]].cmp(&self.files[b[0]]));
        groups
    }

    /// The shortest cycle through the first file of `group`, as files.
    fn shortest_cycle(&self, group: &[usize]) -> Vec<usize> {
        let start = group[0];
        let mut came_from: HashMap<usize, usize> = HashMap::new();
        let mut queue = std::collections::VecDeque::from([start]);
        while let Some(v) = queue.pop_front() {
            for &(from, to) in self.edges.keys() {
                if from != v || !group.contains(&to) {
                    continue;
                }
                if to == start {
                    let mut cycle = vec![v];
                    while let Some(&prev) = came_from.get(cycle.last().unwrap()) {
                        cycle.push(prev);
                    }
                    cycle.reverse();
                    return cycle;
                }
                if to != start && !came_from.contains_key(&to) {
                    came_from.insert(to, v);
                    queue.push_back(to);
                }
            }
        }
        unreachable!("a strongly connected group has a cycle through each file")
    }

    fn edge_names(&self, from: usize, to: usize) -> String {
        let names: Vec<&str> = self.edges[&(from, to)].iter().map(String::as_str).collect();
        names.join(", ")
    }

    /// A group of files that import each other: one shortest cycle, then every
    /// edge inside the group (each lies on some cycle), with the names that make it.
    fn describe(&self, group: &[usize]) -> String {
        let mut out = String::new();
        let cycle = self.shortest_cycle(group);
        out.push_str(&format!("import cycle among {} files:\n", group.len()));
        for (i, &from) in cycle.iter().enumerate() {
            let to = cycle[(i + 1) % cycle.len()];
            out.push_str(&format!(
                "  {} -> {}  ({})\n",
                self.files[from],
                self.files[to],
                self.edge_names(from, to)
            ));
        }
        let inside: Vec<(usize, usize)> = self
            .edges
            .keys()
            .copied()
            .filter(|(from, to)| group.contains(from) && group.contains(to))
            .collect();
        if inside.len() > cycle.len() {
            out.push_str("  every edge inside the group:\n");
            for (from, to) in inside {
                out.push_str(&format!(
                    "    {} -> {}  ({})\n",
                    self.files[from],
                    self.files[to],
                    self.edge_names(from, to)
                ));
            }
        }
        out
    }
}

/// Where the files of the modules declared in `path` live.
fn child_dir(path: &str) -> String {
    let (dir, file) = path.rsplit_once('/').unwrap_or(("", path));
    let dir = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    match file {
        "mod.rs" | "lib.rs" | "main.rs" => dir,
        _ => format!("{dir}{}/", file.trim_end_matches(".rs")),
    }
}

fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    match item {
        syn::Item::Const(i) => &i.attrs,
        syn::Item::Enum(i) => &i.attrs,
        syn::Item::ExternCrate(i) => &i.attrs,
        syn::Item::Fn(i) => &i.attrs,
        syn::Item::ForeignMod(i) => &i.attrs,
        syn::Item::Impl(i) => &i.attrs,
        syn::Item::Macro(i) => &i.attrs,
        syn::Item::Mod(i) => &i.attrs,
        syn::Item::Static(i) => &i.attrs,
        syn::Item::Struct(i) => &i.attrs,
        syn::Item::Trait(i) => &i.attrs,
        syn::Item::TraitAlias(i) => &i.attrs,
        syn::Item::Type(i) => &i.attrs,
        syn::Item::Union(i) => &i.attrs,
        syn::Item::Use(i) => &i.attrs,
        _ => &[],
    }
}

/// The `use` items nested in bodies, skipping test-only code.
#[derive(Default)]
struct UseCollector {
    found: Vec<Import>,
}

impl<'ast> Visit<'ast> for UseCollector {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if is_test_only(item_attrs(item)) {
            return;
        }
        match item {
            syn::Item::Use(u) => imports(&u.tree, &mut Vec::new(), &mut self.found),
            syn::Item::Mod(_) => {}
            _ => syn::visit::visit_item(self, item),
        }
    }

    fn visit_impl_item(&mut self, item: &'ast syn::ImplItem) {
        if !is_test_only(impl_item_attrs(item)) {
            syn::visit::visit_impl_item(self, item);
        }
    }
}

fn impl_item_attrs(item: &syn::ImplItem) -> &[syn::Attribute] {
    match item {
        syn::ImplItem::Const(i) => &i.attrs,
        syn::ImplItem::Fn(i) => &i.attrs,
        syn::ImplItem::Type(i) => &i.attrs,
        syn::ImplItem::Macro(i) => &i.attrs,
        _ => &[],
    }
}

fn trait_item_attrs(item: &syn::TraitItem) -> &[syn::Attribute] {
    match item {
        syn::TraitItem::Const(i) => &i.attrs,
        syn::TraitItem::Fn(i) => &i.attrs,
        syn::TraitItem::Type(i) => &i.attrs,
        syn::TraitItem::Macro(i) => &i.attrs,
        _ => &[],
    }
}

/// Every path a file names outside test-only code, with the module it is
/// named from: paths in code and types, private `use` leaves, and
/// `a::b` sequences inside macro invocations.
struct References<'g> {
    modules: &'g [Module],
    module: usize,
    found: Vec<(usize, Vec<String>)>,
}

impl References<'_> {
    fn tokens(&mut self, tokens: TokenStream) {
        let mut path: Vec<String> = Vec::new();
        let mut colons = 0;
        let flush = |path: &mut Vec<String>, found: &mut Vec<(usize, Vec<String>)>, module| {
            if !path.is_empty() {
                found.push((module, std::mem::take(path)));
            }
        };
        for tree in tokens {
            match tree {
                TokenTree::Ident(ident) if path.is_empty() || colons == 2 => {
                    path.push(ident.to_string());
                    colons = 0;
                }
                TokenTree::Punct(p) if p.as_char() == ':' && !path.is_empty() && colons < 2 => {
                    colons += 1;
                }
                other => {
                    flush(&mut path, &mut self.found, self.module);
                    colons = 0;
                    match other {
                        TokenTree::Group(g) => self.tokens(g.stream()),
                        TokenTree::Ident(ident) => path.push(ident.to_string()),
                        _ => {}
                    }
                }
            }
        }
        flush(&mut path, &mut self.found, self.module);
    }
}

impl<'ast> Visit<'ast> for References<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if is_test_only(item_attrs(item)) {
            return;
        }
        match item {
            syn::Item::Use(u) => {
                if matches!(u.vis, syn::Visibility::Inherited) {
                    let mut found = Vec::new();
                    imports(&u.tree, &mut Vec::new(), &mut found);
                    for import in found.into_iter().filter(|i| i.name.is_some()) {
                        self.found.push((self.module, import.path));
                    }
                }
            }
            syn::Item::Mod(m) => {
                // An inline module is a scope of its own; `mod x;` is another file.
                if m.content.is_some() {
                    let outer = self.module;
                    self.module = self.modules[outer].children[&m.ident.to_string()];
                    syn::visit::visit_item_mod(self, m);
                    self.module = outer;
                }
            }
            _ => syn::visit::visit_item(self, item),
        }
    }

    fn visit_impl_item(&mut self, item: &'ast syn::ImplItem) {
        if !is_test_only(impl_item_attrs(item)) {
            syn::visit::visit_impl_item(self, item);
        }
    }

    fn visit_trait_item(&mut self, item: &'ast syn::TraitItem) {
        if !is_test_only(trait_item_attrs(item)) {
            syn::visit::visit_trait_item(self, item);
        }
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.found.push((self.module, segments));
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

/// Tarjan's strongly connected components.
struct Tarjan<'a> {
    next: &'a [Vec<usize>],
    index: Vec<Option<usize>>,
    low: Vec<usize>,
    on_stack: Vec<bool>,
    stack: Vec<usize>,
    counter: usize,
    components: Vec<Vec<usize>>,
}

impl Tarjan<'_> {
    fn visit(&mut self, v: usize) {
        self.index[v] = Some(self.counter);
        self.low[v] = self.counter;
        self.counter += 1;
        self.stack.push(v);
        self.on_stack[v] = true;
        for &w in self.next[v].iter() {
            match self.index[w] {
                None => {
                    self.visit(w);
                    self.low[v] = self.low[v].min(self.low[w]);
                }
                Some(index) if self.on_stack[w] => self.low[v] = self.low[v].min(index),
                Some(_) => {}
            }
        }
        if Some(self.low[v]) == self.index[v] {
            let mut component = Vec::new();
            while let Some(w) = self.stack.pop() {
                self.on_stack[w] = false;
                component.push(w);
                if w == v {
                    break;
                }
            }
            self.components.push(component);
        }
    }
}

// ---- function lengths --------------------------------------------------------

/// Every function of a file outside test-only code: (name, first line, lines).
struct Functions {
    found: Vec<(String, usize, usize)>,
}

impl Functions {
    fn record(&mut self, sig: &syn::Signature, body: &syn::Block) {
        let first = sig.fn_token.span.start().line;
        let last = body.brace_token.span.close().end().line;
        self.found
            .push((sig.ident.to_string(), first, last + 1 - first));
    }
}

impl<'ast> Visit<'ast> for Functions {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if !is_test_only(item_attrs(item)) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_item_fn(&mut self, f: &'ast syn::ItemFn) {
        self.record(&f.sig, &f.block);
        syn::visit::visit_item_fn(self, f);
    }

    fn visit_impl_item(&mut self, item: &'ast syn::ImplItem) {
        if !is_test_only(impl_item_attrs(item)) {
            syn::visit::visit_impl_item(self, item);
        }
    }

    fn visit_impl_item_fn(&mut self, f: &'ast syn::ImplItemFn) {
        self.record(&f.sig, &f.block);
        syn::visit::visit_impl_item_fn(self, f);
    }

    fn visit_trait_item(&mut self, item: &'ast syn::TraitItem) {
        if !is_test_only(trait_item_attrs(item)) {
            syn::visit::visit_trait_item(self, item);
        }
    }

    fn visit_trait_item_fn(&mut self, f: &'ast syn::TraitItemFn) {
        if let Some(body) = &f.default {
            self.record(&f.sig, body);
        }
        syn::visit::visit_trait_item_fn(self, f);
    }
}

/// `path:line: fn name is N lines` for every function over the limit.
fn long_functions(path: &str, text: &str) -> Vec<String> {
    let mut functions = Functions { found: Vec::new() };
    functions.visit_file(&parse(path, text));
    functions
        .found
        .into_iter()
        .filter(|&(_, _, lines)| lines > MAX_FUNCTION_LINES)
        .map(|(name, line, lines)| format!("{path}:{line}: fn {name} is {lines} lines"))
        .collect()
}

// ---- names that must stay in their place ---------------------------------------

/// The lines of `text` where `word` appears as an identifier or keyword (not
/// in a comment or a string).
fn identifier_lines(path: &str, text: &str, word: &str) -> Vec<usize> {
    fn walk(tokens: TokenStream, word: &str, out: &mut Vec<usize>) {
        for tree in tokens {
            match tree {
                TokenTree::Ident(ident) if ident == word => out.push(ident.span().start().line),
                TokenTree::Group(group) => walk(group.stream(), word, out),
                _ => {}
            }
        }
    }
    let tokens: TokenStream = text
        .parse()
        .unwrap_or_else(|e| panic!("{path}: cannot tokenize: {e}"));
    let mut lines = Vec::new();
    walk(tokens, word, &mut lines);
    lines
}

/// `path:line` of every use of `word` in the sources of `src/`, `tests/` and
/// `benches/` outside the files `allowed` says yes to.
fn misplaced(word: &str, allowed: impl Fn(&str) -> bool) -> Vec<String> {
    let mut found = Vec::new();
    for dir in ["src", "tests", "benches"] {
        for path in rust_files(dir) {
            if allowed(&path) {
                continue;
            }
            let text = read_source(&path).unwrap();
            for line in identifier_lines(&path, &text, word) {
                found.push(format!("{path}:{line}"));
            }
        }
    }
    found
}

// ---- the checks ----------------------------------------------------------------

#[test]
fn no_import_cycle_between_source_files() {
    let graph = ImportGraph::of_crate();
    // The graph is the crate's: every file, and the edges a glance confirms.
    assert_eq!(
        graph.files.len(),
        rust_files("src").len(),
        "files in the graph"
    );
    let edge = |from: &str, to: &str| {
        let index = |path: &str| graph.files.iter().position(|f| f == path).unwrap();
        graph.edges.contains_key(&(index(from), index(to)))
    };
    assert!(edge("src/cli/mod.rs", "src/cli/train.rs"));
    assert!(edge("src/model/checkpoint.rs", "src/model/weights.rs"));
    let groups = graph.cycles();
    let report: Vec<String> = groups.iter().map(|g| graph.describe(g)).collect();
    assert!(
        groups.is_empty(),
        "{} group(s) of source files import each other; move the named items so that \
         the dependencies point one way:\n\n{}",
        groups.len(),
        report.join("\n")
    );
}

#[test]
fn no_long_functions_in_the_engine_and_the_cpu_backend() {
    let mut long = Vec::new();
    for dir in SHORT_FUNCTION_DIRS {
        for path in rust_files(dir) {
            long.extend(long_functions(&path, &read_source(&path).unwrap()));
        }
    }
    assert!(
        long.is_empty(),
        "functions longer than {MAX_FUNCTION_LINES} lines (split them into named steps):\n{}",
        long.join("\n")
    );
}

#[test]
fn the_cli_parser_is_named_only_in_the_cli() {
    let crate_name = "clap";
    let found = misplaced(crate_name, |path| path.starts_with(CLI_DIR));
    assert!(
        found.is_empty(),
        "`{crate_name}` outside {CLI_DIR} (the library parses and prints names with \
         FromStr/Display; the CLI builds its parsers from them):\n{}",
        found.join("\n")
    );
}

#[test]
fn unsafe_code_only_in_the_allowed_files() {
    for path in UNSAFE_ALLOWED {
        assert!(
            root().join(path).exists(),
            "{path} is allowed unsafe code but does not exist: update UNSAFE_ALLOWED"
        );
    }
    let keyword = "unsafe";
    let found = misplaced(keyword, |path| UNSAFE_ALLOWED.contains(&path));
    assert!(
        found.is_empty(),
        "`{keyword}` outside {UNSAFE_ALLOWED:?} (ARCHITECTURE.md, invariant 3):\n{}",
        found.join("\n")
    );
}

// ---- the checker itself --------------------------------------------------------

/// An in-memory tree of `(path, text)` files.
fn graph_of(files: &[(&str, &str)]) -> ImportGraph {
    let files: HashMap<String, String> = files
        .iter()
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect();
    ImportGraph::build(&["src/lib.rs", "src/main.rs"], &|p| files.get(p).cloned())
}

fn cycle_reports(graph: &ImportGraph) -> Vec<String> {
    graph.cycles().iter().map(|g| graph.describe(g)).collect()
}

#[test]
fn the_checker_finds_a_cycle_through_reexports_and_names_its_items() {
    let graph = graph_of(&[
        ("src/lib.rs", "pub mod a; pub mod b; pub mod c;"),
        // A re-export facade: no edge of its own.
        ("src/a/mod.rs", "mod inner; pub use inner::{Thing, make};"),
        (
            "src/a/inner.rs",
            "pub struct Thing; pub fn make() -> Thing { crate::b::helper(); Thing }",
        ),
        ("src/b.rs", "use crate::a::Thing; pub fn helper() {}"),
        (
            "src/c.rs",
            "pub fn f() { let _ = crate::a::make(); } \
             #[cfg(test)] mod tests { use crate::b::helper; }",
        ),
        (
            "src/main.rs",
            "mod cli; fn main() { cli::run(); anemone::c::f(); }",
        ),
        (
            "src/cli.rs",
            "pub fn run() { format!(\"{:?}\", anemone::b::helper()); }",
        ),
    ]);
    let path = |i: usize| graph.files[i].as_str();
    let edges: BTreeSet<(&str, &str, String)> = graph
        .edges
        .keys()
        .map(|&(from, to)| (path(from), path(to), graph.edge_names(from, to)))
        .collect();
    let want = [
        ("src/a/inner.rs", "src/b.rs", "helper"),
        ("src/b.rs", "src/a/inner.rs", "Thing"),
        ("src/c.rs", "src/a/inner.rs", "make"),
        ("src/cli.rs", "src/b.rs", "helper"),
        ("src/main.rs", "src/c.rs", "f"),
        ("src/main.rs", "src/cli.rs", "run"),
    ];
    let want: BTreeSet<(&str, &str, String)> = want
        .iter()
        .map(|&(a, b, n)| (a, b, n.to_string()))
        .collect();
    assert_eq!(edges, want);
    let reports = cycle_reports(&graph);
    assert_eq!(reports.len(), 1, "{reports:?}");
    assert_eq!(
        reports[0],
        "import cycle among 2 files:\n  \
         src/a/inner.rs -> src/b.rs  (helper)\n  \
         src/b.rs -> src/a/inner.rs  (Thing)\n"
    );
}

#[test]
fn the_checker_follows_super_globs_variants_and_inline_modules() {
    let graph = graph_of(&[
        ("src/lib.rs", "pub mod x; pub mod y;"),
        (
            "src/x/mod.rs",
            "pub mod leaf; mod open; pub use open::open; pub enum Mode { A, B }",
        ),
        ("src/x/open.rs", "pub fn open() {}"),
        (
            "src/x/leaf.rs",
            "use super::*; pub fn pick() -> bool { matches!(crate::y::z::G, Mode::A) }",
        ),
        (
            "src/y.rs",
            "pub mod z { use crate::x::Mode::*; pub const G: crate::x::Mode = B; } \
             pub fn f() { crate::x::open() }",
        ),
        ("src/main.rs", "fn main() {}"),
    ]);
    let reports = cycle_reports(&graph);
    assert!(reports.is_empty(), "{reports:?}");
    let path = |i: usize| graph.files[i].as_str();
    let edges: BTreeMap<(&str, &str), String> = graph
        .edges
        .keys()
        .map(|&(from, to)| ((path(from), path(to)), graph.edge_names(from, to)))
        .collect();
    assert_eq!(edges[&("src/x/leaf.rs", "src/x/mod.rs")], "Mode");
    assert_eq!(edges[&("src/x/leaf.rs", "src/y.rs")], "G");
    assert_eq!(edges[&("src/y.rs", "src/x/mod.rs")], "Mode");
    assert_eq!(edges[&("src/y.rs", "src/x/open.rs")], "open");
    assert_eq!(edges.len(), 4, "{edges:?}");
}

#[test]
fn the_length_and_name_checks_see_what_they_must() {
    // `short` is the longest allowed: signature, body, closing brace.
    let body = "    let x = 1;\n".repeat(MAX_FUNCTION_LINES - 2);
    let text = format!(
        "fn short() {{\n{body}}}\nimpl T {{ fn long() {{\n{body}    x;\n}} }}\n\
         #[cfg(test)]\nmod tests {{ fn also_long() {{\n{body}    x;\n}} }}\n"
    );
    assert_eq!(
        long_functions("src/train/t.rs", &text),
        [format!(
            "src/train/t.rs:{}: fn long is {} lines",
            MAX_FUNCTION_LINES + 1,
            MAX_FUNCTION_LINES + 1
        )]
    );
    let word = "clap";
    let text = format!(
        "// {word}\nfn f() {{ let s = \"{word}\"; }}\n#[derive({word}::Parser)]\nstruct A;\n"
    );
    assert_eq!(identifier_lines("a.rs", &text, word), [3]);
}
