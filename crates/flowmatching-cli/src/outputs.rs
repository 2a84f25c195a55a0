//! A command's output files, handled as one transaction: every output is declared before any work and
//! checked against the command's inputs and the other outputs; each is written to a temporary file
//! beside its target; [`Outputs::commit`] renames them all into place at the end. A command that fails
//! (or is interrupted) before the commit leaves none of its outputs, no temporary file and no folder it
//! created.
//!
//! Targets are regular files or names that do not exist yet: a folder, device, pipe or socket is
//! refused; a symbolic link is followed (its target is replaced, the link stays).

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use flowmatching::checkpoint::{remove_stale_temporaries, temporary_path, META_FILE};

/// An output file: where it ends up (symbolic links resolved) and the flag that named it.
struct Planned {
    target: PathBuf,
    given: PathBuf,
    flag: String,
}

/// The outputs of one command. See the module documentation.
#[derive(Default)]
pub struct Outputs {
    /// Files the command reads (canonical paths) and what they are.
    inputs: Vec<(PathBuf, String)>,
    /// Folders the command reads (a folder of images, Fashion-MNIST's): no output may go inside.
    input_folders: Vec<(PathBuf, String)>,
    planned: Vec<Planned>,
    /// Temporary files written, with their targets.
    staged: Vec<(PathBuf, PathBuf)>,
    /// Folders created for outputs (removed again, if still empty, when the command fails).
    created: Vec<PathBuf>,
}

impl Outputs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a file the command reads (a name that does not exist is ignored: reading it fails
    /// with its own message).
    pub fn input(&mut self, path: &Path, what: &str) {
        if let Ok(p) = std::fs::canonicalize(path) {
            if p.is_file() {
                self.inputs.push((p, what.to_string()));
            }
        }
    }

    /// Registers a folder the command reads: outputs inside it are refused.
    pub fn input_folder(&mut self, path: &Path, what: &str) {
        if let Ok(p) = std::fs::canonicalize(path) {
            if p.is_dir() {
                self.input_folders.push((p, what.to_string()));
            }
        }
    }

    /// Registers `--data`-like specs that name a file or a folder of images (built-in set names are
    /// neither).
    pub fn data(&mut self, spec: &str, flag: &str) {
        let path = Path::new(spec);
        if path.is_dir() {
            self.input_folder(path, &format!("inside the {flag} folder"));
        } else {
            self.input(path, &format!("the {flag} file"));
        }
    }

    /// Registers `--data-dir` (Fashion-MNIST's folder), given or the default one.
    pub fn data_dir(&mut self, dir: Option<&Path>) {
        let d = dir.unwrap_or(Path::new(crate::images::FASHION_DIR));
        self.input_folder(d, "inside the Fashion-MNIST folder (--data-dir)");
    }

    /// Registers the files of the checkpoint at `path` (a folder or its checkpoint.json): the JSON, the
    /// tensor file it names and every other tensor file beside it.
    pub fn checkpoint(&mut self, path: &Path) {
        let dir = if path.is_dir() {
            path.to_path_buf()
        } else {
            match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            }
        };
        let what = "a file of the checkpoint being read";
        let meta = if path.is_dir() {
            dir.join(META_FILE)
        } else {
            path.to_path_buf()
        };
        self.input(&meta, what);
        let named = std::fs::read(&meta)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["weights_file"].as_str().map(String::from));
        if let Some(w) = named {
            self.input(&dir.join(w), what);
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".safetensors") {
                self.input(&e.path(), what);
            }
        }
    }

    /// Declares an output named by `flag`, before any work: refuses a target that is not a regular
    /// file, that is one of the inputs, or that another output already names.
    pub fn declare(&mut self, path: &Path, flag: &str) -> Result<()> {
        let target = target_of(path, flag)?;
        if let Some((_, what)) = self.inputs.iter().find(|(p, _)| *p == target) {
            bail!(
                "{flag} {} is {what}, an input of this command; writing it would destroy the input. \
                 Choose another file",
                path.display()
            );
        }
        if let Some((_, what)) = self
            .input_folders
            .iter()
            .find(|(d, _)| target.starts_with(d))
        {
            bail!(
                "{flag} {} is {what}, an input of this command; an output there would change the \
                 input. Choose another place",
                path.display()
            );
        }
        if let Some(a) = target.ancestors().skip(1).find(|a| a.exists()) {
            if !a.is_dir() {
                bail!(
                    "{flag} {}: {} is a file, not a folder",
                    path.display(),
                    a.display()
                );
            }
        }
        if let Some(other) = self.planned.iter().find(|p| p.target == target) {
            bail!(
                "{flag} {} and {} {} name the same file; give each output its own name",
                path.display(),
                other.flag,
                other.given.display()
            );
        }
        self.planned.push(Planned {
            target,
            given: path.to_path_buf(),
            flag: flag.to_string(),
        });
        Ok(())
    }

    /// Writes the bytes of a declared output to its temporary file (flushed to disk). The target is
    /// untouched until [`Outputs::commit`].
    pub fn write(&mut self, path: &Path, bytes: &[u8]) -> Result<()> {
        let Some(p) = self.planned.iter().find(|p| p.given == path) else {
            bail!("internal error: output {} was not declared", path.display());
        };
        let target = p.target.clone();
        if let Some(parent) = target.parent() {
            self.create_folders(parent)?;
        }
        remove_stale_temporaries(&target);
        let tmp = temporary_path(&target);
        self.staged.push((tmp.clone(), target));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()
        })();
        result.with_context(|| format!("cannot write {}", path.display()))
    }

    /// Renames every written output into place. Outputs declared but never written are not created.
    pub fn commit(mut self) -> Result<()> {
        let staged = std::mem::take(&mut self.staged);
        for (k, (tmp, target)) in staged.iter().enumerate() {
            if let Err(e) = std::fs::rename(tmp, target) {
                for (t, _) in &staged[k..] {
                    let _ = std::fs::remove_file(t);
                }
                bail!("cannot write {}: {e}", target.display());
            }
        }
        self.created.clear();
        Ok(())
    }

    /// Creates `dir` and the folders above it that are missing, remembering which ones it made.
    fn create_folders(&mut self, dir: &Path) -> Result<()> {
        for m in crate::io::missing_folders(dir).into_iter().rev() {
            std::fs::create_dir(&m)
                .with_context(|| format!("cannot create output folder {}", m.display()))?;
            self.created.push(m);
        }
        Ok(())
    }
}

impl Drop for Outputs {
    /// Not committed: the temporary files and the folders made for them go.
    fn drop(&mut self) {
        for (tmp, _) in &self.staged {
            let _ = std::fs::remove_file(tmp);
        }
        for d in self.created.iter().rev() {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Where writing `path` ends up: the path itself (absolute, normalised) when it does not exist yet, the
/// file when it is a regular file, the link's target when it is a symbolic link to a regular file.
fn target_of(path: &Path, flag: &str) -> Result<PathBuf> {
    if path.file_name().is_none() {
        bail!("{flag} {} does not name a file", path.display());
    }
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(std::fs::canonicalize(path)?),
        Ok(m) if m.is_dir() => bail!("{flag} {} is a folder; name a file", path.display()),
        Ok(_) => bail!(
            "{flag} {} is not a regular file (a device, pipe or socket); outputs are written as \
             regular files only",
            path.display()
        ),
        Err(_) if std::fs::symlink_metadata(path).is_ok() => bail!(
            "{flag} {} is a symbolic link to a missing file; remove the link or name another file",
            path.display()
        ),
        Err(_) => Ok(absolute(path)),
    }
}

/// `path` made absolute through its longest existing ancestor (symbolic links of that part resolved),
/// the rest normalised lexically.
fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut rest: Vec<Component> = vec![];
    let mut base = joined.as_path();
    let canonical = loop {
        if let Ok(c) = std::fs::canonicalize(base) {
            break c;
        }
        match (base.components().next_back(), base.parent()) {
            (Some(last), Some(parent)) => {
                rest.push(last);
                base = parent;
            }
            _ => break base.to_path_buf(),
        }
    };
    let mut out = canonical;
    for part in rest.into_iter().rev() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("fm-outputs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn outputs_appear_together_at_commit() {
        let d = tmpdir("commit");
        let (a, b) = (d.join("a.npy"), d.join("sub/b.json"));
        let mut o = Outputs::new();
        o.declare(&a, "--out").unwrap();
        o.declare(&b, "--plot").unwrap();
        o.write(&a, b"1").unwrap();
        o.write(&b, b"2").unwrap();
        assert!(!a.exists() && !b.exists());
        o.commit().unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), b"1");
        assert_eq!(std::fs::read(&b).unwrap(), b"2");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_uncommitted_command_leaves_nothing() {
        let d = tmpdir("drop");
        let a = d.join("new/deeper/a.npy");
        let mut o = Outputs::new();
        o.declare(&a, "--out").unwrap();
        o.write(&a, b"1").unwrap();
        drop(o);
        assert!(!d.join("new").exists());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn inputs_clashes_and_special_files_are_refused() {
        let d = tmpdir("refuse");
        let input = d.join("data.npy");
        std::fs::write(&input, b"x").unwrap();
        let mut o = Outputs::new();
        o.input(&input, "the --data file");
        // The same file by another spelling, and through a symbolic link.
        let e = o.declare(&d.join("./x/../data.npy"), "--out").unwrap_err();
        assert!(e.to_string().contains("an input"), "{e}");
        let link = d.join("link.npy");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        assert!(o.declare(&link, "--out").is_err());
        o.declare(&d.join("s.npy"), "--out").unwrap();
        let e = o.declare(&d.join("s.npy"), "--plot").unwrap_err();
        assert!(e.to_string().contains("same file"), "{e}");
        let e = o.declare(Path::new("/dev/null"), "--out").unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let e = o.declare(&d, "--out").unwrap_err();
        assert!(e.to_string().contains("folder"), "{e}");
        assert_eq!(std::fs::read(&input).unwrap(), b"x");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_symbolic_link_is_followed_and_kept() {
        let d = tmpdir("link");
        let real = d.join("real.npy");
        std::fs::write(&real, b"old").unwrap();
        let link = d.join("link.npy");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let mut o = Outputs::new();
        o.declare(&link, "--out").unwrap();
        o.write(&link, b"new").unwrap();
        o.commit().unwrap();
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read(&real).unwrap(), b"new");
        let _ = std::fs::remove_dir_all(&d);
    }
}
