//! The house's invariants, checked on the source tree (docs/ARCHITECTURE.md, "Invariants"):
//!
//! - no import circle between the files of one crate: `use crate::…`, `super::…` and
//!   inline `crate::…` paths are edges from the file that writes them to the file that
//!   defines the item (re-exports followed), and the graph of each crate is acyclic;
//! - the dependency arrows between the workspace's crates run one way: keel-store knows no
//!   other keel crate, keel-engine does not depend on sled, only the CLI knows clap;
//!   keel-store-postgres depends on keel-store alone among keel crates, and only keel-cli
//!   depends on it (keel-engine never: a service picks its backend); keel-lossyfs (the
//!   power-loss test filesystem) is nobody's normal dependency and knows no keel crate.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing, missing_docs)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The library and binary crates of the workspace: (name, src dir, root file).
fn crates() -> Vec<(String, PathBuf, PathBuf)> {
    let ws = workspace();
    let mut out = Vec::new();
    for dir in ["store", "engine", "engine/demo", "replay", "replay/cli", "replay/bench", "proptests"] {
        let src = ws.join(dir).join("src");
        for root in ["lib.rs", "main.rs"] {
            if src.join(root).exists() {
                out.push((format!("{dir}:{root}"), src.clone(), src.join(root)));
            }
        }
    }
    out.extend(extra_crates(&ws));
    out
}

/// Crates added under the fixed top level after this test was written (any `*/*/Cargo.toml`).
fn extra_crates(ws: &Path) -> Vec<(String, PathBuf, PathBuf)> {
    let known = ["engine/demo", "replay/cli", "replay/bench"];
    let mut out = Vec::new();
    for top in ["store", "engine", "replay", "proptests"] {
        let Ok(entries) = std::fs::read_dir(ws.join(top)) else { continue };
        for e in entries.flatten() {
            let dir = e.path();
            let rel = format!("{top}/{}", e.file_name().to_string_lossy());
            if known.contains(&rel.as_str()) || !dir.join("Cargo.toml").exists() {
                continue;
            }
            for root in ["lib.rs", "main.rs"] {
                if dir.join("src").join(root).exists() {
                    out.push((format!("{rel}:{root}"), dir.join("src"), dir.join("src").join(root)));
                }
            }
        }
    }
    out
}

/// A module path (`["core", "apply"]`) for each source file of a crate, and back.
struct Modules {
    by_path: BTreeMap<Vec<String>, PathBuf>,
}

impl Modules {
    fn scan(src: &Path, root: &Path) -> Modules {
        let mut by_path = BTreeMap::new();
        by_path.insert(Vec::new(), root.to_path_buf());
        let mut stack = vec![(src.to_path_buf(), Vec::<String>::new())];
        while let Some((dir, prefix)) = stack.pop() {
            for e in std::fs::read_dir(&dir).unwrap().flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if p.is_dir() {
                    let mut m = prefix.clone();
                    m.push(name.clone());
                    if p.join("mod.rs").exists() {
                        by_path.insert(m.clone(), p.join("mod.rs"));
                    }
                    stack.push((p, m));
                } else if let Some(stem) = name.strip_suffix(".rs") {
                    if prefix.is_empty() && (stem == "lib" || stem == "main") || stem == "mod" {
                        continue;
                    }
                    let mut m = prefix.clone();
                    m.push(stem.to_owned());
                    by_path.insert(m, p);
                }
            }
        }
        Modules { by_path }
    }

    fn module_of(&self, file: &Path) -> Vec<String> {
        self.by_path.iter().find(|(_, f)| f.as_path() == file).map(|(m, _)| m.clone()).unwrap()
    }
}

/// Source text with comments, strings and `#[cfg(test)]` modules removed.
fn code_of(file: &Path) -> String {
    let text = std::fs::read_to_string(file).unwrap();
    let mut out = String::new();
    for line in text.lines() {
        let line = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        out.push_str(line);
        out.push('\n');
    }
    // Unit-test modules import their parent with `super::*`; they are not part of the
    // crate's structure.
    if let Some(i) = out.find("#[cfg(test)]\nmod tests") {
        out.truncate(i);
    }
    strip_strings(&out)
}

fn strip_strings(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut in_str = false;
    let mut prev = ' ';
    for c in s.chars() {
        if c == '"' && prev != '\\' && prev != '\'' {
            in_str = !in_str;
            out.push('"');
        } else if !in_str {
            out.push(c);
        }
        prev = if prev == '\\' && c == '\\' { ' ' } else { c };
    }
    out
}

/// Every path written in `code` that starts with `crate::`, `super::` or `self::`, with
/// use-trees expanded (`crate::{a::X, b::{Y, Z}}` gives three paths).
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let at_word_start = i == 0 || !(chars[i - 1].is_alphanumeric() || chars[i - 1] == '_' || chars[i - 1] == ':');
        let rest: String = chars[i..chars.len().min(i + 7)].iter().collect();
        if at_word_start && (rest.starts_with("crate::") || rest.starts_with("super::") || rest.starts_with("self::")) {
            let (paths, next) = parse_tree(&chars, i, Vec::new());
            out.extend(paths);
            i = next.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

/// Parses a use-tree at `i`: `a::b::{c, d::e}` or `a::b::*`; returns the expanded paths.
fn parse_tree(chars: &[char], mut i: usize, prefix: Vec<String>) -> (Vec<Vec<String>>, usize) {
    let mut path = prefix;
    loop {
        while i < chars.len() && chars[i].is_whitespace() {
            i += 1;
        }
        if i < chars.len() && chars[i] == '{' {
            i += 1;
            let mut all = Vec::new();
            loop {
                while i < chars.len() && (chars[i].is_whitespace() || chars[i] == ',') {
                    i += 1;
                }
                if i >= chars.len() || chars[i] == '}' {
                    return (all, i + 1);
                }
                let (sub, next) = parse_tree(chars, i, path.clone());
                all.extend(sub);
                i = next;
            }
        }
        let start = i;
        while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == '*') {
            i += 1;
        }
        if start == i {
            return (vec![path], i);
        }
        path.push(chars[start..i].iter().collect());
        if chars.get(i) == Some(&':') && chars.get(i + 1) == Some(&':') {
            i += 2;
        } else {
            return (vec![path], i);
        }
    }
}

/// `pub use` re-exports of a file: exported name -> the path it points at (absolute from
/// the crate root), and glob sources.
fn reexports(mods: &Modules, file: &Path) -> (BTreeMap<String, Vec<String>>, Vec<Vec<String>>) {
    let code = code_of(file);
    let here = mods.module_of(file);
    let mut names = BTreeMap::new();
    let mut globs = Vec::new();
    for stmt in code.split(';') {
        let Some(at) = stmt.find("pub use ") else { continue };
        let body = &stmt[at + "pub use ".len()..];
        let chars: Vec<char> = body.chars().collect();
        let (paths, _) = parse_tree(&chars, 0, Vec::new());
        for p in paths {
            let abs = absolute(&here, &p, mods);
            let Some(abs) = abs else { continue };
            match abs.last().map(String::as_str) {
                Some("*") => globs.push(abs[..abs.len() - 1].to_vec()),
                Some(name) => {
                    let name = name.to_owned();
                    names.insert(name, abs);
                }
                None => {}
            }
        }
    }
    (names, globs)
}

/// A written path made absolute from the crate root, or None if it leaves the crate.
fn absolute(here: &[String], p: &[String], mods: &Modules) -> Option<Vec<String>> {
    let first = p.first()?;
    let mut base: Vec<String> = match first.as_str() {
        "crate" => Vec::new(),
        "self" => here.to_vec(),
        "super" => here[..here.len().saturating_sub(1)].to_vec(),
        // a plain `use x::…` inside a module file names a child module of that file
        name if mods.by_path.contains_key(&[here, &[name.to_owned()]].concat()) => {
            return Some([here, p].concat());
        }
        _ => return None,
    };
    let mut rest = &p[1..];
    while rest.first().map(String::as_str) == Some("super") {
        base.pop();
        rest = &rest[1..];
    }
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The file that defines the item a path names, following re-exports.
fn target(mods: &Modules, abs: &[String], depth: usize) -> Option<PathBuf> {
    if depth > 8 {
        return None;
    }
    // The longest module prefix that is a file.
    let mut k = abs.len();
    while k > 0 && !mods.by_path.contains_key(&abs[..k]) {
        k -= 1;
    }
    let module = &abs[..k];
    let file = mods.by_path.get(module)?;
    let Some(item) = abs.get(k) else { return Some(file.clone()) };
    if item == "*" {
        return Some(file.clone());
    }
    let code = code_of(file);
    let defines = ["struct", "enum", "fn", "trait", "type", "const", "static", "mod", "macro_rules!"]
        .iter()
        .any(|kw| code.contains(&format!("{kw} {item}")));
    if defines {
        return Some(file.clone());
    }
    let (names, globs) = reexports(mods, file);
    if let Some(to) = names.get(item) {
        return target(mods, to, depth + 1);
    }
    for g in globs {
        let mut p = g.clone();
        p.push(item.clone());
        if let Some(t) = target(mods, &p, depth + 1) {
            if t != *file {
                return Some(t);
            }
        }
    }
    Some(file.clone())
}

fn edges(src: &Path, root: &Path) -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mods = Modules::scan(src, root);
    let mut g: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for (module, file) in &mods.by_path {
        let code = code_of(file);
        let out = g.entry(file.clone()).or_default();
        for p in paths_in(&code) {
            let Some(abs) = absolute(module, &p, &mods) else { continue };
            // `mod x;` declarations and a parent's `pub use child::…` are structure, not
            // imports: a module may re-export its own children.
            if abs.len() > module.len() && abs[..module.len()] == module[..] {
                continue;
            }
            if let Some(t) = target(&mods, &abs, 0) {
                if t != *file && t != *root {
                    out.insert(t);
                }
            }
        }
    }
    g
}

/// One cycle of the graph, if any (depth-first search with colours).
fn find_cycle(g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Option<Vec<PathBuf>> {
    fn visit(
        n: &PathBuf,
        g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        colour: &mut BTreeMap<PathBuf, u8>,
        stack: &mut Vec<PathBuf>,
    ) -> Option<Vec<PathBuf>> {
        colour.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in g.get(n).into_iter().flatten() {
            match colour.get(m).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|x| x == m).unwrap();
                    let mut c = stack[at..].to_vec();
                    c.push(m.clone());
                    return Some(c);
                }
                0 => {
                    if let Some(c) = visit(m, g, colour, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        colour.insert(n.clone(), 2);
        None
    }
    let mut colour = BTreeMap::new();
    for n in g.keys() {
        if colour.get(n).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, g, &mut colour, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn no_import_circle_between_the_files_of_any_crate() {
    let ws = workspace();
    let mut failures = Vec::new();
    for (name, src, root) in crates() {
        let g = edges(&src, &root);
        let n_edges: usize = g.values().map(BTreeSet::len).sum();
        println!("{name}: {} files, {n_edges} import edges", g.len());
        if let Some(cycle) = find_cycle(&g) {
            let shown: Vec<String> =
                cycle.iter().map(|p| p.strip_prefix(&ws).unwrap_or(p).display().to_string()).collect();
            failures.push(format!("{name}: {}", shown.join(" -> ")));
        }
    }
    assert!(failures.is_empty(), "import circles:\n{}", failures.join("\n"));
}

#[test]
fn the_cycle_finder_finds_a_planted_circle() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\nmod c;\npub use a::A;\n").unwrap();
    std::fs::write(src.join("a.rs"), "use crate::b::B;\npub struct A;\n").unwrap();
    std::fs::write(src.join("b.rs"), "pub struct B;\npub fn f() { crate::c::g() }\n").unwrap();
    std::fs::write(src.join("c.rs"), "use crate::{A, b};\npub fn g() {}\n").unwrap();
    let g = edges(src, &src.join("lib.rs"));
    let cycle = find_cycle(&g).expect("a -> b -> c -> a (through the root's re-export of A)");
    assert_eq!(cycle.len(), 4, "{cycle:?}");
    std::fs::write(src.join("c.rs"), "pub fn g() {}\n").unwrap();
    assert_eq!(find_cycle(&edges(src, &src.join("lib.rs"))), None);
}

/// The normal (non-dev) dependencies named in a crate's Cargo.toml.
fn normal_deps(dir: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(workspace().join(dir).join("Cargo.toml")).unwrap();
    let mut out = BTreeSet::new();
    let mut in_deps = false;
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            in_deps = line == "[dependencies]";
            continue;
        }
        if in_deps {
            if let Some(name) = line.split(['.', ' ', '=']).next().filter(|n| !n.is_empty() && !n.starts_with('#')) {
                out.insert(name.to_owned());
            }
        }
    }
    out
}

#[test]
fn the_arrows_between_crates_run_one_way() {
    let store = normal_deps("store");
    assert!(store.iter().all(|d| !d.starts_with("keel-")), "keel-store depends on no other keel crate: {store:?}");
    let engine = normal_deps("engine");
    assert!(!engine.contains("sled"), "keel-engine does not depend on sled");
    assert!(!engine.iter().any(|d| d == "keel-replay" || d == "keel-demo"), "{engine:?}");
    let replay = normal_deps("replay");
    for banned in ["clap", "indicatif", "sled", "tempfile", "libc"] {
        assert!(!replay.contains(banned), "keel-replay is a library without {banned}");
    }
    for dir in ["store", "engine", "engine/demo", "replay", "replay/bench", "replay/cli"] {
        let deps = normal_deps(dir);
        if dir != "replay/cli" {
            assert!(!deps.contains("clap"), "{dir}: only the CLI parses command lines");
        }
        assert!(!deps.contains("prometheus"), "{dir}: only the server crate knows the metrics format");
        for http in ["axum", "hyper", "hyper-util", "http-body-util", "tower-http", "utoipa", "rustls", "tokio-rustls"]
        {
            assert!(!deps.contains(http), "{dir}: only the server crate knows HTTP ({http})");
        }
    }
    let server = normal_deps("replay/server");
    assert!(!server.contains("clap"), "replay/server: only the CLI parses command lines");
    assert!(!server.contains("sled"), "replay/server: it reaches the log through the engine");
}

/// The workspace's member directories, from the root Cargo.toml.
fn members() -> Vec<String> {
    let text = std::fs::read_to_string(workspace().join("Cargo.toml")).unwrap();
    let line = text.lines().find(|l| l.trim_start().starts_with("members")).unwrap();
    line.split('"').skip(1).step_by(2).map(str::to_owned).collect()
}

#[test]
fn the_lossy_test_filesystem_is_a_test_dependency_only() {
    let members = members();
    assert!(members.iter().any(|m| m == "store/lossyfs"), "{members:?}");
    for dir in &members {
        assert!(!normal_deps(dir).contains("keel-lossyfs"), "{dir}: keel-lossyfs is for tests only");
    }
    let fs = normal_deps("store/lossyfs");
    assert!(!fs.iter().any(|d| d.starts_with("keel-")), "keel-lossyfs knows keel only in its tests: {fs:?}");
}

#[test]
fn the_postgres_backend_depends_on_keel_store_only_and_only_the_cli_depends_on_it() {
    let pg = normal_deps("store/postgres");
    let keel: Vec<&String> = pg.iter().filter(|d| d.starts_with("keel-")).collect();
    assert_eq!(keel, ["keel-store"], "keel-store-postgres: keel-store is its only keel crate");
    for banned in ["sled", "clap", "axum", "hyper"] {
        assert!(!pg.contains(banned), "keel-store-postgres does not depend on {banned}");
    }
    assert!(!normal_deps("store").iter().any(|d| d.contains("postgres")), "keel-store knows no PostgreSQL");
    let members = members();
    assert!(members.iter().any(|m| m == "store/postgres"), "{members:?}");
    // keel-cli opens `--db postgres://…` (replay/cli/src/backend.rs), and keel-bench measures
    // it (its `postgres` section); nothing else does.
    assert!(normal_deps("replay/cli").contains("keel-store-postgres"), "keel-cli opens PostgreSQL stores");
    let allowed = ["store/postgres", "replay/cli", "replay/bench"];
    for dir in members.iter().filter(|m| !allowed.contains(&m.as_str())) {
        assert!(!normal_deps(dir).contains("keel-store-postgres"), "{dir} depends on keel-store-postgres");
    }
}
