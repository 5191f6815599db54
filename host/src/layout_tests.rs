//! The shape of the crate, checked on every test run: the top-level modules
//! of `host/src` import one another without a cycle, no file is over
//! [`MAX_FILE_LINES`] lines and no function over [`MAX_FN_LINES`] (test
//! files and modules aside). Read from the source, so the next change is
//! checked as this one was.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_FILE_LINES: usize = 600;
const MAX_FN_LINES: usize = 100;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The top-level module a file belongs to: `conn` for `src/conn/front.rs`.
fn module_of(root: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(root).expect("under src");
    let first = relative.components().next().expect("a component");
    first.as_os_str().to_string_lossy().trim_end_matches(".rs").to_owned()
}

fn is_test_file(file: &Path) -> bool {
    let name = file
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    name == "tests.rs" || name.ends_with("_tests.rs")
}

/// Code lines of a file, comments dropped, cut at its `#[cfg(test)]` module.
fn code(text: &str) -> Vec<&str> {
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.trim() == "#[cfg(test)]" {
            break;
        }
        lines.push(line);
    }
    lines
}

/// Every module `crate::` paths name in `text`, `use crate::{a, b::c}` included.
fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in code(text) {
        if line.trim_start().starts_with("//") {
            continue;
        }
        // A trailing comment is no import.
        let mut rest = line.split(" //").next().unwrap_or(line);
        while let Some(at) = rest.find("crate::") {
            rest = &rest[at + "crate::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                let end = group.find('}').unwrap_or(group.len());
                for item in group[..end].split(',') {
                    let name: String = item
                        .trim()
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    out.insert(name);
                }
            } else {
                out.insert(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
            }
        }
    }
    out.retain(|name| !name.is_empty() && name.chars().next().is_some_and(|c| c.is_lowercase()));
    out
}

/// A cycle in `graph`, if there is one, as the path that closes it.
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut found = path[at..].to_vec();
            found.push(node.to_owned());
            return Some(found);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = src();
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files.iter().filter(|f| !is_test_file(f)) {
        let module = module_of(&root, file);
        if module == "lib" || module == "main" {
            continue;
        }
        let text = std::fs::read_to_string(file).expect("read");
        let edges = graph.entry(module.clone()).or_default();
        edges.extend(imports(&text).into_iter().filter(|m| *m != module));
    }
    graph
}

#[test]
fn host_modules_import_one_another_without_a_cycle() {
    let graph = graph();
    assert!(graph.len() > 10, "the source was read: {graph:?}");
    assert!(
        graph["conn"].contains("plugin"),
        "imports are seen: {:?}",
        graph["conn"]
    );
    assert_eq!(cycle(&graph), None, "an import cycle among host modules");
}

#[test]
fn a_cycle_is_found() {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    graph.entry("a".into()).or_default().insert("b".into());
    graph.entry("b".into()).or_default().insert("c".into());
    assert_eq!(cycle(&graph), None);
    graph.entry("c".into()).or_default().insert("a".into());
    assert_eq!(
        cycle(&graph),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
    assert_eq!(
        imports("use crate::{config::Config, tls};\nlet x = crate::wit::Side::Client; // crate::gone"),
        ["config", "tls", "wit"].into_iter().map(String::from).collect()
    );
}

#[test]
fn files_and_functions_stay_small() {
    // The host, and the crates split out of it.
    let workspace = src().join("../..");
    let mut files = Vec::new();
    for root in [
        "host/src",
        "crates/weir-config/src",
        "crates/weir-wire/src",
        "crates/weir-attest/src",
    ] {
        sources(&workspace.join(root), &mut files);
    }
    let mut too_long = Vec::new();
    for file in files.iter().filter(|f| !is_test_file(f)) {
        let text = std::fs::read_to_string(file).expect("read");
        let lines = code(&text);
        let name = file
            .strip_prefix(&workspace)
            .expect("under the workspace")
            .display()
            .to_string();
        if lines.len() > MAX_FILE_LINES {
            too_long.push(format!("{name}: {} lines", lines.len()));
        }
        // A function runs from its `fn` line to the first line closing at
        // the same indentation.
        for (start, line) in lines.iter().enumerate() {
            let trimmed = line.trim_start();
            let indent = line.len() - trimmed.len();
            let is_fn = [
                "fn ",
                "pub fn ",
                "pub(crate) fn ",
                "async fn ",
                "pub async fn ",
                "pub(crate) async fn ",
            ]
            .iter()
            .any(|p| trimmed.starts_with(p));
            if !is_fn || trimmed.ends_with(';') {
                continue;
            }
            let close = format!("{}}}", " ".repeat(indent));
            if let Some(len) = lines[start..].iter().position(|l| *l == close)
                && len + 1 > MAX_FN_LINES
            {
                too_long.push(format!("{name}:{}: a function of {} lines", start + 1, len + 1));
            }
        }
    }
    assert!(too_long.is_empty(), "over the limits:\n{}", too_long.join("\n"));
}
