//! Ignore rules: the built-in defaults for editor and OS junk, then the device's
//! own `.replibox-ignore` at the sync dir's root, in gitignore syntax.
//!
//! Matching is the `ignore` crate's gitignore module (ripgrep's), not a matcher of
//! our own: gitignore's anchoring, `**`, folder-only patterns and `!` negation
//! have many corners that users expect to work exactly as in git.
//!
//! An ignored path is neither sent nor deleted nor received: the engine leaves it
//! alone in every direction. `.replibox-ignore` itself starts with `.replibox`, so
//! it is never synced either: each device has its own rules, like Syncthing's
//! `.stignore`.

use ignore::gitignore::{Gitignore, GitignoreBuilder};
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// The rules file, at the sync dir's root.
pub const RULES_FILE: &str = ".replibox-ignore";

/// Ignored unless `.replibox-ignore` says otherwise with `!PATTERN`: swap, backup
/// and lock files of editors (vim, emacs) and the folder metadata of macOS and
/// Windows, which every user has and nobody means to sync.
pub const DEFAULTS: [&str; 6] = ["*.swp", "*~", ".#*", ".DS_Store", "Thumbs.db", "desktop.ini"];

/// What identifies one version of the rules file (size, mtime, inode), or None
/// while there is no file.
type Stamp = Option<(u64, i64, i64, u64)>;

fn stamp(root: &Path) -> Stamp {
    let md = fs::metadata(root.join(RULES_FILE)).ok()?;
    Some((md.len(), md.mtime(), md.mtime_nsec(), md.ino()))
}

/// The rules in force.
pub struct Rules {
    matcher: Gitignore,
    stamp: Stamp,
    /// Lines of the rules file that could not be used, for the user.
    pub problems: Vec<String>,
}

impl Rules {
    /// The defaults, then `ROOT/.replibox-ignore` if there is one. A line that is
    /// not a valid pattern is skipped and reported in `problems`; the others apply.
    pub fn load(root: &Path) -> Rules {
        // The stamp is taken before reading: a change made while reading shows
        // as a changed stamp next time, and is read then.
        let stamp = stamp(root);
        let mut builder = GitignoreBuilder::new(root);
        for pattern in DEFAULTS {
            builder.add_line(None, pattern).expect("the default patterns are valid");
        }
        let mut problems = Vec::new();
        let file = root.join(RULES_FILE);
        match fs::read(&file) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                for (n, line) in text.lines().enumerate() {
                    if let Err(e) = builder.add_line(Some(file.clone()), line) {
                        problems.push(format!("{RULES_FILE} line {}: {e}; that line is skipped", n + 1));
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => problems.push(format!("cannot read {}: {e}; only the default rules apply", file.display())),
        }
        let matcher = builder.build().unwrap_or_else(|e| {
            problems.push(format!("{RULES_FILE}: {e}; no rules apply"));
            Gitignore::empty()
        });
        Rules { matcher, stamp, problems }
    }

    /// True when the rules file changed on disk since these rules were loaded.
    pub fn stale(&self, root: &Path) -> bool {
        stamp(root) != self.stamp
    }

    /// True when `rel` (a path relative to the sync dir) or a folder on its way is
    /// ignored. `is_dir` says whether `rel` itself is a folder (`build/` matches
    /// only folders).
    pub fn ignores(&self, rel: &str, is_dir: bool) -> bool {
        self.matcher.matched_path_or_any_parents(rel, is_dir).is_ignore()
    }

    /// True when the folder `rel` is ignored by a pattern of its own. The scan asks
    /// this of each folder before entering it, so a parent was asked first.
    pub fn ignores_dir(&self, rel: &str) -> bool {
        self.matcher.matched(rel, true).is_ignore()
    }

    /// True when the file `rel`, in a folder that is not ignored, is.
    pub fn ignores_file(&self, rel: &str) -> bool {
        self.matcher.matched(rel, false).is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn root_with(name: &str, rules: Option<&str>) -> PathBuf {
        let root = std::env::temp_dir().join(format!("replibox-rules-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(&root).unwrap();
        if let Some(r) = rules {
            fs::write(root.join(RULES_FILE), r).unwrap();
        }
        root
    }

    #[test]
    fn defaults_apply_without_a_file() {
        let root = root_with("defaults", None);
        let rules = Rules::load(&root);
        for junk in [".notes.txt.swp", "a/b/notes.txt~", ".#lock", "x/.DS_Store", "Thumbs.db", "d/desktop.ini"] {
            assert!(rules.ignores(junk, false), "{junk} should be ignored by default");
        }
        for kept in ["notes.txt", "swp", "a~b.txt", "desktop.ini.txt"] {
            assert!(!rules.ignores(kept, false), "{kept} should not be ignored");
        }
        assert!(rules.problems.is_empty());
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_file_adds_rules_and_overrides_defaults() {
        let root = root_with("file", Some("# comment\n*.log\nbuild/\n/top.tmp\n!*.swp\n!important.log\n"));
        let rules = Rules::load(&root);
        assert!(rules.ignores("debug.log", false));
        assert!(rules.ignores("sub/debug.log", false));
        assert!(!rules.ignores("important.log", false), "a later ! re-includes");
        assert!(rules.ignores("build/out/a.o", false), "a file under an ignored folder");
        assert!(rules.ignores_dir("build") && rules.ignores_dir("sub/build"));
        assert!(!rules.ignores("build", false), "build/ matches folders only");
        assert!(rules.ignores("top.tmp", false) && !rules.ignores("sub/top.tmp", false), "anchored pattern");
        assert!(!rules.ignores(".notes.swp", false), "!*.swp overrides the default");
        assert!(rules.ignores("notes~", false), "other defaults still apply");
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_bad_line_is_reported_and_the_rest_applies() {
        let root = root_with("bad", Some("*.log\na{b\n*.tmp\n"));
        let rules = Rules::load(&root);
        assert_eq!(rules.problems.len(), 1, "{:?}", rules.problems);
        assert!(rules.problems[0].contains("line 2"), "{:?}", rules.problems);
        assert!(rules.ignores("x.log", false) && rules.ignores("x.tmp", false));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn a_changed_file_makes_the_rules_stale() {
        let root = root_with("stale", None);
        let rules = Rules::load(&root);
        assert!(!rules.stale(&root));
        fs::write(root.join(RULES_FILE), "*.log\n").unwrap();
        assert!(rules.stale(&root));
        let rules = Rules::load(&root);
        assert!(!rules.stale(&root) && rules.ignores("a.log", false));
        fs::remove_file(root.join(RULES_FILE)).unwrap();
        assert!(rules.stale(&root));
        let _ = fs::remove_dir_all(&root);
    }
}
