//! The repository's own rules, checked by `cargo xtask tidy` and by an ordinary test.

use std::path::{Path, PathBuf};

/// Fields every publishable crate must have.
const REQUIRED_FIELDS: [&str; 6] = [
    "description",
    "license",
    "repository",
    "readme",
    "keywords",
    "categories",
];

fn read_toml(path: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.parse::<toml::Table>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The member crates: every `c2dm-*` folder at the repository root with a Cargo.toml.
pub fn member_manifests(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = crate_dirs(root)
        .into_iter()
        .map(|dir| dir.join("Cargo.toml"))
        .filter(|p| p.exists())
        .collect();
    out.sort();
    out
}

/// The folders of the member crates: `c2dm-*` at the repository root (the layout the design
/// card fixed: no `crates/` folder).
fn crate_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("c2dm-"))
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

fn is_publishable(package: &toml::Table) -> bool {
    !matches!(package.get("publish"), Some(toml::Value::Boolean(false)))
}

/// Internal path dependencies must carry a version (so they survive publishing); the one
/// exception is a path-only dev-dependency, which `cargo publish` strips (used to break a
/// dev-dependency cycle).
fn check_dependencies(root: &Path, problems: &mut Vec<String>) {
    let Ok(workspace) = read_toml(&root.join("Cargo.toml")) else {
        problems.push("Cargo.toml: unreadable".into());
        return;
    };
    let deps = workspace
        .get("workspace")
        .and_then(|w| w.get("dependencies"))
        .and_then(|d| d.as_table())
        .cloned()
        .unwrap_or_default();
    for (name, spec) in &deps {
        if spec.get("path").is_some() && spec.get("version").is_none() {
            problems.push(format!(
                "Cargo.toml: [workspace.dependencies] {name} has a path but no version"
            ));
        }
    }
    for manifest in member_manifests(root) {
        let Ok(table) = read_toml(&manifest) else {
            problems.push(format!("{}: unreadable", manifest.display()));
            continue;
        };
        for section in ["dependencies", "build-dependencies"] {
            let Some(deps) = table.get(section).and_then(|d| d.as_table()) else {
                continue;
            };
            for (name, spec) in deps {
                if spec.get("path").is_some() && spec.get("version").is_none() {
                    problems.push(format!(
                        "{}: [{section}] {name} has a path but no version",
                        manifest.display()
                    ));
                }
            }
        }
    }
}

fn check_metadata(root: &Path, problems: &mut Vec<String>) {
    let workspace_package = read_toml(&root.join("Cargo.toml"))
        .ok()
        .and_then(|t| t.get("workspace")?.get("package")?.as_table().cloned())
        .unwrap_or_default();
    for manifest in member_manifests(root) {
        let Ok(table) = read_toml(&manifest) else {
            continue;
        };
        let Some(package) = table.get("package").and_then(|p| p.as_table()) else {
            continue;
        };
        if !is_publishable(package) {
            continue;
        }
        for field in REQUIRED_FIELDS {
            let present = match package.get(field) {
                Some(toml::Value::Table(t)) if t.get("workspace").is_some() => {
                    workspace_package.contains_key(field)
                }
                Some(_) => true,
                None => false,
            };
            if !present {
                problems.push(format!(
                    "{}: package.{field} is missing",
                    manifest.display()
                ));
            }
        }
    }
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// No `hyper_util` type may appear in c2dm-hyper's public API, so hyper-util upgrades never
/// break its users: no public item's signature and no re-export mentions it.
fn check_hyper_api(root: &Path, problems: &mut Vec<String>) {
    for file in rust_files(&root.join("c2dm-hyper/src")) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("").trim();
            let public = code.starts_with("pub ") && !code.starts_with("pub(crate)");
            if public && code.contains("hyper_util") {
                problems.push(format!(
                    "{}:{}: hyper_util in the public API: {code}",
                    file.display(),
                    n + 1
                ));
            }
        }
    }
}

/// No `todo!` or `unimplemented!` outside tests.
fn check_no_todo(root: &Path, problems: &mut Vec<String>) {
    let mut files: Vec<PathBuf> = crate_dirs(root)
        .iter()
        .flat_map(|dir| rust_files(dir))
        .collect();
    files.extend(rust_files(&root.join("xtask/src")));
    let needles = [concat!("todo", "!("), concat!("unimplemented", "!(")];
    for file in files {
        if file.components().any(|c| c.as_os_str() == "tests") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (n, line) in lines_outside_tests(&text) {
            if needles.iter().any(|needle| line.contains(needle)) {
                problems.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
            }
        }
    }
}

/// The lines of a file (numbered from 0) that are not inside an item marked `#[cfg(test)]`. An
/// item runs from the attribute to the close of its first brace block (or its `;`), counted by
/// braces outside string and character literals and comments, so code after a test module is
/// read again.
fn lines_outside_tests(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let mut skipping = false;
    let mut depth = 0usize;
    let mut opened = false;
    for (n, line) in text.lines().enumerate() {
        if !skipping && line.trim_start().starts_with("#[cfg(test)]") {
            skipping = true;
            depth = 0;
            opened = false;
            continue;
        }
        if !skipping {
            out.push((n, line));
            continue;
        }
        for c in code_chars(line) {
            match c {
                '{' => {
                    depth += 1;
                    opened = true;
                }
                '}' => depth = depth.saturating_sub(1),
                ';' if !opened => opened = true,
                _ => {}
            }
        }
        if opened && depth == 0 {
            skipping = false;
        }
    }
    out
}

/// The characters of one line that are code: not in a `//` comment, a string or a char literal.
fn code_chars(line: &str) -> impl Iterator<Item = char> + '_ {
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = line.chars().peekable();
    let mut done = false;
    std::iter::from_fn(move || {
        while !done {
            let c = chars.next()?;
            if in_string {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == '"' {
                    in_string = false;
                }
                continue;
            }
            match c {
                '"' => in_string = true,
                '/' if chars.peek() == Some(&'/') => done = true,
                '\'' => {
                    // A char literal ('{', '\\'') or a lifetime ('a): skip a literal whole.
                    let rest: String = chars.clone().take(3).collect();
                    if rest.starts_with('\\') {
                        chars.nth(2);
                    } else if rest.chars().nth(1) == Some('\'') {
                        chars.nth(1);
                    }
                }
                c => return Some(c),
            }
        }
        None
    })
}

/// The modules of the crate whose sources are in `src`: each file or folder right under it (a
/// folder's files are one module), but the crate root.
fn modules(src: &Path) -> std::collections::BTreeMap<String, Vec<PathBuf>> {
    let mut modules = std::collections::BTreeMap::new();
    for file in rust_files(src) {
        let Ok(rel) = file.strip_prefix(src) else {
            continue;
        };
        let first = rel
            .components()
            .next()
            .map(|c| c.as_os_str().to_string_lossy().into_owned());
        let Some(first) = first else { continue };
        let name = first.trim_end_matches(".rs").to_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        modules.entry(name).or_insert_with(Vec::new).push(file);
    }
    modules
}

/// The names that `text` reaches through `crate::`: `crate::a::b` and every top-level name of
/// `crate::{a, b::c}`.
fn crate_paths(text: &str) -> Vec<String> {
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut start = 0;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        names.push(ident(&group[start..i]));
                        start = i + 1;
                        if c == '}' {
                            break;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
        } else {
            names.push(ident(rest));
        }
    }
    names.retain(|n| !n.is_empty());
    names
}

/// No two modules of a crate import each other, directly or through others (test code aside).
fn check_no_import_cycles(root: &Path, problems: &mut Vec<String>) {
    let mut sources: Vec<PathBuf> = crate_dirs(root).iter().map(|d| d.join("src")).collect();
    sources.push(root.join("xtask/src"));
    for src in sources {
        let modules = modules(&src);
        let mut edges: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> =
            std::collections::BTreeMap::new();
        for (name, files) in &modules {
            let targets = edges.entry(name.as_str()).or_default();
            for file in files {
                let Ok(text) = std::fs::read_to_string(file) else {
                    continue;
                };
                let code: Vec<&str> = lines_outside_tests(&text)
                    .into_iter()
                    .map(|(_, l)| l)
                    .collect();
                for target in crate_paths(&code.join("\n")) {
                    if let Some((other, _)) = modules.get_key_value(&target)
                        && other != name
                    {
                        targets.insert(other.as_str());
                    }
                }
            }
        }
        for start in edges.keys() {
            // Depth-first from `start`, reporting a path that comes back to it once.
            let mut stack = vec![(*start, vec![*start])];
            let mut seen = std::collections::BTreeSet::new();
            while let Some((node, path)) = stack.pop() {
                for next in edges.get(node).into_iter().flatten() {
                    if next == start {
                        // Reported once, from its smallest module.
                        if path.iter().all(|m| m >= start) {
                            problems.push(format!(
                                "{}: modules import each other: {} -> {start}",
                                src.display(),
                                path.join(" -> ")
                            ));
                        }
                    } else if seen.insert(*next) {
                        let mut longer = path.clone();
                        longer.push(next);
                        stack.push((next, longer));
                    }
                }
            }
        }
    }
}

/// The packages that `cargo tree` (`{p}|{f}` a line, no prefix) shows with more than one set
/// of features, each with its sets. A package the program and the compiler's macros both use
/// is built twice when the sets differ.
fn split_features(tree: &str) -> Vec<String> {
    let mut sets: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> =
        std::collections::BTreeMap::new();
    for line in tree.lines() {
        let line = line.trim_end().trim_end_matches(" (*)");
        if let Some((package, features)) = line.split_once('|') {
            sets.entry(package).or_default().insert(features);
        }
    }
    sets.into_iter()
        .filter(|(_, features)| features.len() > 1)
        .map(|(package, features)| {
            let features: Vec<String> = features.iter().map(|f| format!("[{f}]")).collect();
            format!(
                "{package} is built with {} sets of features ({}): give c2dm-cli's \
                 [dependencies] or [build-dependencies] what the other side has",
                features.len(),
                features.join(" and ")
            )
        })
        .collect()
}

/// The `c2dm` program's build compiles each package once: the same features for the program
/// and for the compiler's macros (c2dm-cli's `[build-dependencies]` say why). Runs `cargo
/// tree`, so it is apart from [`check`], whose rules read files only.
pub fn check_build(root: &Path) -> Vec<String> {
    let out = std::process::Command::new(crate::cargo())
        .current_dir(root)
        .args(["tree", "--locked", "-p", "c2dm-cli", "-e", "normal,build"])
        .args(["--prefix", "none", "--format", "{p}|{f}"])
        .output();
    match out {
        Ok(out) if out.status.success() => split_features(&String::from_utf8_lossy(&out.stdout)),
        Ok(out) => vec![format!(
            "cargo tree failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )],
        Err(e) => vec![format!("cargo tree: {e}")],
    }
}

/// The `dist` profile builds every crate at opt-level 3: each crate that `release` lowers for
/// the demo's build time (opt-level 1 or 2) is raised again there, since a custom profile
/// inherits `release`'s per-crate settings. Crates `release` leaves at 0 only run in the
/// compiler, and stay there.
fn check_dist_profile(workspace: &toml::Table, problems: &mut Vec<String>) {
    let packages = |profile: &str| {
        workspace
            .get("profile")
            .and_then(|p| p.get(profile))
            .and_then(|p| p.get("package"))
            .and_then(toml::Value::as_table)
            .cloned()
            .unwrap_or_default()
    };
    if workspace
        .get("profile")
        .and_then(|p| p.get("dist"))
        .is_none()
    {
        problems.push("Cargo.toml: [profile.dist] is missing".into());
        return;
    }
    let dist = packages("dist");
    for (name, settings) in packages("release") {
        let lowered = settings
            .get("opt-level")
            .is_some_and(|level| level.as_integer().is_none_or(|n| (1..3).contains(&n)));
        if !lowered {
            continue;
        }
        let raised = dist
            .get(&name)
            .and_then(|s| s.get("opt-level"))
            .and_then(toml::Value::as_integer)
            == Some(3);
        if !raised {
            problems.push(format!(
                "Cargo.toml: [profile.release.package.{name}] lowers its opt-level, and \
                 [profile.dist.package.{name}] does not set it back to 3"
            ));
        }
    }
}

/// Every rule that reads files only; an empty list means all hold.
pub fn check(root: &Path) -> Vec<String> {
    let mut problems = Vec::new();
    check_dependencies(root, &mut problems);
    if let Ok(workspace) = read_toml(&root.join("Cargo.toml")) {
        check_dist_profile(&workspace, &mut problems);
    }
    check_metadata(root, &mut problems);
    check_hyper_api(root, &mut problems);
    check_no_todo(root, &mut problems);
    check_no_import_cycles(root, &mut problems);
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_repository_is_tidy() {
        let problems = check(&crate::root());
        assert!(
            problems.is_empty(),
            "tidy rules broken:\n{}",
            problems.join("\n")
        );
    }

    #[test]
    fn the_program_is_built_with_one_set_of_features_per_package() {
        let problems = check_build(&crate::root());
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn a_crate_lowered_in_release_must_be_raised_in_dist() {
        let workspace: toml::Table = "[profile.release.package.a]\nopt-level = 1\n\
             [profile.release.package.b]\nopt-level = \"s\"\n\
             [profile.release.package.c]\nopt-level = 1\n\
             [profile.release.package]\nd = { opt-level = 0 }\n\
             [profile.dist]\ninherits = \"release\"\n\
             [profile.dist.package.c]\nopt-level = 3\n"
            .parse()
            .unwrap();
        let mut problems = Vec::new();
        check_dist_profile(&workspace, &mut problems);
        let text = problems.join("\n");
        assert_eq!(problems.len(), 2, "{text}");
        assert!(text.contains("[profile.dist.package.a]"), "{text}");
        assert!(text.contains("[profile.dist.package.b]"), "{text}");
        let mut problems = Vec::new();
        check_dist_profile(&toml::Table::new(), &mut problems);
        assert_eq!(problems, ["Cargo.toml: [profile.dist] is missing"]);
    }

    #[test]
    fn a_package_with_two_feature_sets_is_named_with_both() {
        let tree = "c2dm-cli v0.1.0 (/x)|\n\
                    tokio v1.0.0|macros,rt\n\
                    sqlx-core v0.9.0|any,json\n\
                    tokio v1.0.0|rt (*)\n\
                    sqlx-core v0.9.0|any,json (*)\n";
        let problems = split_features(tree);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].starts_with(
                "tokio v1.0.0 is built with 2 sets of features ([macros,rt] and [rt])"
            ),
            "{problems:?}"
        );
    }

    #[test]
    fn the_rules_catch_what_they_are_for() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(
            root.join("Cargo.toml"),
            "[workspace]\n[workspace.package]\nlicense = \"MIT\"\n[workspace.dependencies]\na = { path = \"a\" }\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.join("c2dm-hyper/src")).unwrap();
        std::fs::write(
            root.join("c2dm-hyper/Cargo.toml"),
            "[package]\nname = \"c2dm-hyper\"\nlicense.workspace = true\n[dependencies]\nb = { path = \"../b\" }\n[dev-dependencies]\nc = { path = \"../c\" }\n",
        )
        .unwrap();
        std::fs::write(
            root.join("c2dm-hyper/src/lib.rs"),
            format!(
                "pub fn f() -> hyper_util::X {{}}\nfn g() -> hyper_util::Y {{}}\nfn h() {{ {todo}) }}\n#[cfg(test)]\nmod tests {{\n    fn t() {{ let _ = '{{'; let _ = \"}}\"; {todo}) }}\n}}\nfn after_the_tests() {{ {todo}) }}\n",
                todo = concat!("todo", "!("),
            ),
        )
        .unwrap();
        let problems = check(root);
        let text = problems.join("\n");
        assert!(
            text.contains("[workspace.dependencies] a has a path but no version"),
            "{text}"
        );
        assert!(
            text.contains("[dependencies] b has a path but no version"),
            "{text}"
        );
        assert!(
            !text.contains(" c has a path"),
            "path-only dev-dependencies are allowed: {text}"
        );
        assert!(text.contains("package.description is missing"), "{text}");
        assert!(!text.contains("package.license is missing"), "{text}");
        assert!(text.contains("hyper_util in the public API"), "{text}");
        assert_eq!(
            text.matches("hyper_util in the public API").count(),
            1,
            "{text}"
        );
        // Two modules that import each other, one through a group and a path; a test module's
        // imports do not count.
        std::fs::write(
            root.join("c2dm-hyper/src/a.rs"),
            "use crate::{b::B, other};\npub struct A;\n",
        )
        .unwrap();
        std::fs::create_dir_all(root.join("c2dm-hyper/src/b")).unwrap();
        std::fs::write(
            root.join("c2dm-hyper/src/b/mod.rs"),
            "pub struct B(crate::a::A);\n#[cfg(test)]\nmod tests {\n    use crate::c::C;\n}\n",
        )
        .unwrap();
        std::fs::write(root.join("c2dm-hyper/src/c.rs"), "use crate::b::B;\n").unwrap();
        let text = check(root).join("\n");
        assert!(
            text.contains("modules import each other: a -> b -> a"),
            "{text}"
        );
        assert_eq!(text.matches("import each other").count(), 1, "{text}");
        // The one in `h` and the one after the test module; not the one inside it.
        assert_eq!(text.matches(concat!("todo", "!(")).count(), 2, "{text}");
        assert!(text.contains("lib.rs:3:"), "{text}");
        assert!(text.contains("lib.rs:8:"), "{text}");
    }
}
