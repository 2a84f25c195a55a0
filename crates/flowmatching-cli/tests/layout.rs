//! The command line's layout, checked: each subcommand is a small module that calls the library and
//! never another subcommand's module.

use std::path::Path;

/// The longest subcommand module allowed, in lines.
const MAX_COMMAND_LINES: usize = 400;

#[test]
fn commands_are_small_and_independent() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/cmd");
    let mut problems = vec![];
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines = text.lines().count();
        if lines > MAX_COMMAND_LINES {
            problems.push(format!("{}: {lines} lines", path.display()));
        }
        if text.contains("crate::cmd::") || text.contains("use crate::cmd") {
            problems.push(format!("{} imports another command", path.display()));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
