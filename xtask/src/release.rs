//! `cargo xtask release`: bump every version, move the changelog's Unreleased section under the
//! new version, check packaging, then commit and tag. Publishing stays a human step.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A semantic version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    pub major: u64,
    pub minor: u64,
    pub patch: u64,
}

impl Version {
    pub fn parse(text: &str) -> Result<Self, String> {
        let parts: Vec<&str> = text.trim().split('.').collect();
        let [major, minor, patch] = parts.as_slice() else {
            return Err(format!("not a version: {text:?} (expected X.Y.Z)"));
        };
        let num = |s: &str| {
            s.parse::<u64>()
                .map_err(|_| format!("not a version: {text:?} (expected X.Y.Z)"))
        };
        Ok(Self {
            major: num(major)?,
            minor: num(minor)?,
            patch: num(patch)?,
        })
    }

    /// The version after `bump`: `major`, `minor`, `patch`, or an explicit `X.Y.Z` that must
    /// be greater.
    pub fn bumped(self, bump: &str) -> Result<Self, String> {
        let next = match bump {
            "major" => Self {
                major: self.major + 1,
                minor: 0,
                patch: 0,
            },
            "minor" => Self {
                major: self.major,
                minor: self.minor + 1,
                patch: 0,
            },
            "patch" => Self {
                patch: self.patch + 1,
                ..self
            },
            explicit => Self::parse(explicit)?,
        };
        let key = |v: Self| (v.major, v.minor, v.patch);
        if key(next) <= key(self) {
            return Err(format!("{next} is not greater than the current {self}"));
        }
        Ok(next)
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The `[workspace.package]` version of a root Cargo.toml.
pub fn workspace_version(manifest: &str) -> Result<Version, String> {
    let table: toml::Table = manifest.parse().map_err(|e| format!("Cargo.toml: {e}"))?;
    let version = table
        .get("workspace")
        .and_then(|w| w.get("package"))
        .and_then(|p| p.get("version"))
        .and_then(|v| v.as_str())
        .ok_or("Cargo.toml: no [workspace.package] version")?;
    Version::parse(version)
}

/// Rewrites the root manifest: the `[workspace.package]` version and the version of every
/// internal (`path = …`) entry of `[workspace.dependencies]`. Everything else, comments
/// and layout included, stays as it is.
pub fn bump_manifest(manifest: &str, from: Version, to: Version) -> Result<String, String> {
    let mut section = String::new();
    let mut out = String::with_capacity(manifest.len());
    let mut package_done = false;
    let old = format!("version = \"{from}\"");
    let new = format!("version = \"{to}\"");
    for line in manifest.split_inclusive('\n') {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            section = trimmed.to_owned();
        }
        let replaced = match section.as_str() {
            "[workspace.package]" if trimmed.starts_with("version") && line.contains(&old) => {
                package_done = true;
                line.replace(&old, &new)
            }
            "[workspace.dependencies]" if line.contains("path = \"") => {
                if !line.contains(&old) {
                    return Err(format!(
                        "internal dependency without version {from}: {}",
                        line.trim()
                    ));
                }
                line.replace(&old, &new)
            }
            _ => line.to_owned(),
        };
        out.push_str(&replaced);
    }
    if !package_done {
        return Err("no [workspace.package] version line to bump".into());
    }
    Ok(out)
}

/// Moves the Unreleased section's entries under a new `## [version] - date` heading and leaves
/// an empty Unreleased section above it. Refuses an empty Unreleased section.
pub fn release_changelog(changelog: &str, version: Version, date: &str) -> Result<String, String> {
    let heading = "## [Unreleased]";
    let start = changelog
        .find(heading)
        .ok_or("CHANGELOG.md: no ## [Unreleased] section")?;
    let body_start = start + heading.len();
    let body_end = changelog[body_start..]
        .find("\n## ")
        .map_or(changelog.len(), |i| body_start + i + 1);
    let body = &changelog[body_start..body_end];
    let has_entries = body.lines().any(|l| l.trim_start().starts_with("- "));
    if !has_entries {
        return Err("CHANGELOG.md: the Unreleased section is empty: nothing to release".into());
    }
    Ok(format!(
        "{}{heading}\n\n## [{version}] - {date}{}{}",
        &changelog[..start],
        body.trim_end_matches('\n').to_owned() + "\n\n",
        &changelog[body_end..]
    )
    .replace("\n\n\n", "\n\n"))
}

/// Today's date (UTC) as YYYY-MM-DD, without a date crate.
pub fn today() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    civil_date((secs / 86_400) as i64)
}

/// Days since 1970-01-01 to a calendar date (Howard Hinnant's algorithm).
pub fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

fn git(root: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(root)
        .output()
        .map_err(|e| format!("git: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The workspace's own crates: the `c2dm-*` folders at the root, each named as its folder.
fn workspace_crates(root: &Path) -> Result<Vec<String>, String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("c2dm-") && entry.path().join("Cargo.toml").is_file() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// The folders in which cargo unpacked an earlier packaging of `crates` at `version`.
///
/// `cargo publish --workspace --dry-run` verifies each crate against its siblings through a
/// local registry in `target/package`, and unpacks their `.crate` files under
/// `$CARGO_HOME/registry/src/-<hash>`, where the hash names that registry's path (a local
/// registry's folder starts with `-`; a remote one's with its host). Cargo reuses a folder it
/// unpacked before, so a second run from the same checkout path verifies against the first
/// run's sources whenever the version did not change. These folders are what to remove first.
pub fn unpacked_sources(cargo_home: &Path, crates: &[String], version: Version) -> Vec<PathBuf> {
    let Ok(registries) = std::fs::read_dir(cargo_home.join("registry").join("src")) else {
        return Vec::new();
    };
    let mut stale = Vec::new();
    for registry in registries.flatten() {
        if !registry.file_name().to_string_lossy().starts_with('-') {
            continue;
        }
        for name in crates {
            let unpacked = registry.path().join(format!("{name}-{version}"));
            if unpacked.is_dir() {
                stale.push(unpacked);
            }
        }
    }
    stale.sort();
    stale
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
}

/// Removes what [`unpacked_sources`] finds, so packaging verifies the crates as they are now.
fn forget_verified_sources(root: &Path, version: Version) -> Result<(), String> {
    let Some(home) = cargo_home() else {
        return Ok(());
    };
    for stale in unpacked_sources(&home, &workspace_crates(root)?, version) {
        std::fs::remove_dir_all(&stale).map_err(|e| format!("{}: {e}", stale.display()))?;
    }
    Ok(())
}

pub fn run(root: &Path, bump: &str, dry_run: bool) -> Result<(), String> {
    if !git(root, &["status", "--porcelain"])?.trim().is_empty() {
        return Err("the working tree has uncommitted changes: commit or stash them first".into());
    }
    let manifest_path = root.join("Cargo.toml");
    let changelog_path = root.join("CHANGELOG.md");
    let manifest = std::fs::read_to_string(&manifest_path).map_err(|e| e.to_string())?;
    let changelog = std::fs::read_to_string(&changelog_path).map_err(|e| e.to_string())?;
    let current = workspace_version(&manifest)?;
    let next = current.bumped(bump)?;
    let new_manifest = bump_manifest(&manifest, current, next)?;
    let new_changelog = release_changelog(&changelog, next, &today())?;
    eprintln!("release {current} -> {next}");
    let cargo = crate::cargo();
    forget_verified_sources(root, current)?;
    if dry_run {
        eprintln!("dry run: Cargo.toml and CHANGELOG.md would change; checking packaging as is");
        return crate::run(
            "packaging",
            &cargo,
            &["publish", "--workspace", "--exclude", "xtask", "--dry-run"],
            &[],
        );
    }
    std::fs::write(&manifest_path, new_manifest).map_err(|e| e.to_string())?;
    forget_verified_sources(root, next)?;
    std::fs::write(&changelog_path, new_changelog).map_err(|e| e.to_string())?;
    // Cargo.lock follows the new versions.
    crate::run("lockfile", &cargo, &["update", "--workspace"], &[])?;
    crate::run(
        "packaging",
        &cargo,
        &[
            "publish",
            "--workspace",
            "--exclude",
            "xtask",
            "--dry-run",
            "--allow-dirty",
        ],
        &[],
    )?;
    git(root, &["commit", "-am", &format!("Release {next}")])?;
    git(
        root,
        &[
            "tag",
            "-a",
            &format!("v{next}"),
            "-m",
            &format!("Release {next}"),
        ],
    )?;
    eprintln!("committed and tagged v{next}; publishing is a human step (see RELEASING.md)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &str = r#"[workspace]
members = ["c2dm-*"]

[workspace.package]
version = "0.1.0"
edition = "2024"

[workspace.dependencies]
c2dm-core = { path = "c2dm-core", version = "0.1.0" }
c2dm-mock = { path = "c2dm-mock", version = "0.1.0" }
# an external crate that happens to be at the same version
other = { version = "0.1.0" }
"#;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn bumps() {
        let current = v("1.2.3");
        assert_eq!(current.bumped("patch").unwrap(), v("1.2.4"));
        assert_eq!(current.bumped("minor").unwrap(), v("1.3.0"));
        assert_eq!(current.bumped("major").unwrap(), v("2.0.0"));
        assert_eq!(current.bumped("1.10.0").unwrap(), v("1.10.0"));
        assert!(current.bumped("1.2.3").is_err());
        assert!(current.bumped("0.9.0").is_err());
        assert!(current.bumped("banana").is_err());
        assert!(Version::parse("1.2").is_err());
    }

    #[test]
    fn manifest_bump_touches_only_our_versions() {
        let from = workspace_version(MANIFEST).unwrap();
        assert_eq!(from, v("0.1.0"));
        let out = bump_manifest(MANIFEST, from, v("0.2.0")).unwrap();
        assert!(out.contains("[workspace.package]\nversion = \"0.2.0\""));
        assert!(out.contains(r#"c2dm-core = { path = "c2dm-core", version = "0.2.0" }"#));
        assert!(out.contains(r#"c2dm-mock = { path = "c2dm-mock", version = "0.2.0" }"#));
        assert!(out.contains(r#"other = { version = "0.1.0" }"#));
        assert!(out.contains("# an external crate"));
        assert_eq!(workspace_version(&out).unwrap(), v("0.2.0"));
    }

    #[test]
    fn manifest_bump_refuses_a_stray_internal_version() {
        let broken = MANIFEST.replace(
            r#"c2dm-mock = { path = "c2dm-mock", version = "0.1.0" }"#,
            r#"c2dm-mock = { path = "c2dm-mock", version = "0.0.9" }"#,
        );
        assert!(bump_manifest(&broken, v("0.1.0"), v("0.2.0")).is_err());
    }

    #[test]
    fn changelog_moves_unreleased_under_the_version() {
        let changelog = "# Changelog\n\nIntro.\n\n## [Unreleased]\n\n### Added\n- a thing\n- another\n\n## [0.1.0] - 2026-01-01\n\n- first\n";
        let out = release_changelog(changelog, v("0.2.0"), "2026-11-27").unwrap();
        assert_eq!(
            out,
            "# Changelog\n\nIntro.\n\n## [Unreleased]\n\n## [0.2.0] - 2026-11-27\n\n### Added\n- a thing\n- another\n\n## [0.1.0] - 2026-01-01\n\n- first\n"
        );
        // Releasing again right away: nothing to release.
        assert!(release_changelog(&out, v("0.3.0"), "2026-11-28").is_err());
    }

    #[test]
    fn changelog_without_older_releases() {
        let changelog = "# Changelog\n\n## [Unreleased]\n\n### Added\n- x\n";
        let out = release_changelog(changelog, v("0.1.0"), "2026-11-27").unwrap();
        assert_eq!(
            out,
            "# Changelog\n\n## [Unreleased]\n\n## [0.1.0] - 2026-11-27\n\n### Added\n- x\n\n"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_419), "2025-11-27");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(today().len(), 10);
    }

    /// The whole bump on a temporary copy of this workspace's real files.
    #[test]
    fn bump_on_a_copy_of_the_workspace() {
        let root = crate::root();
        let dir = tempfile::tempdir().unwrap();
        let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
        let changelog = std::fs::read_to_string(root.join("CHANGELOG.md")).unwrap();
        std::fs::write(dir.path().join("Cargo.toml"), &manifest).unwrap();
        let current = workspace_version(&manifest).unwrap();
        let next = current.bumped("minor").unwrap();
        let bumped = bump_manifest(&manifest, current, next).unwrap();
        std::fs::write(dir.path().join("Cargo.toml"), &bumped).unwrap();
        let reread = std::fs::read_to_string(dir.path().join("Cargo.toml")).unwrap();
        assert_eq!(workspace_version(&reread).unwrap(), next);
        let table: toml::Table = reread.parse().unwrap();
        let deps = table["workspace"]["dependencies"].as_table().unwrap();
        for (name, spec) in deps {
            if spec.get("path").is_some() {
                assert_eq!(
                    spec["version"].as_str().unwrap(),
                    next.to_string(),
                    "{name}"
                );
            }
        }
        if changelog.contains("- ") {
            let released = release_changelog(&changelog, next, "2026-11-27").unwrap();
            assert!(released.contains(&format!("## [{next}] - 2026-11-27")));
        }
    }

    #[test]
    fn finds_the_unpacked_sources_of_an_earlier_packaging_and_nothing_else() {
        let home = tempfile::tempdir().unwrap();
        let src = home.path().join("registry").join("src");
        for dir in [
            "-14cd1cce6819ff87/c2dm-core-0.1.0",
            "-14cd1cce6819ff87/c2dm-core-0.1.1",
            "-14cd1cce6819ff87/c2dm-fcm-0.1.0",
            "-22c3805da5a543b4/c2dm-core-0.1.0",
            "-22c3805da5a543b4/serde-0.1.0",
            "index.crates.io-1949cf8c6b5b557f/c2dm-core-0.1.0",
        ] {
            std::fs::create_dir_all(src.join(dir)).unwrap();
        }
        let crates = ["c2dm-core".to_string(), "c2dm-fcm".to_string()];
        let found = unpacked_sources(home.path(), &crates, v("0.1.0"));
        let found: Vec<_> = found
            .iter()
            .map(|p| p.strip_prefix(&src).unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            found,
            [
                "-14cd1cce6819ff87/c2dm-core-0.1.0",
                "-14cd1cce6819ff87/c2dm-fcm-0.1.0",
                "-22c3805da5a543b4/c2dm-core-0.1.0",
            ]
        );
        assert!(unpacked_sources(&home.path().join("none"), &crates, v("0.1.0")).is_empty());
    }
}
