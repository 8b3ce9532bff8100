//! The open-file limit, raised where a process needs many descriptors at once
//! (a server: a few per connection; a client: the files of a batch of uploads).

/// Raises this process's soft limit on open files to its hard limit, and returns
/// the limit it runs with, or why it cannot be read.
pub fn raise_open_files() -> Result<u64, String> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) =
        getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| format!("cannot read the open-file limit: {e}"))?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        Ok(hard)
    } else {
        Ok(soft)
    }
}

/// This process's soft limit on open files (1024 when it cannot be read).
pub fn open_files() -> u64 {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE).map(|(soft, _)| soft).unwrap_or(1024)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_limit_is_at_least_what_it_was() {
        let before = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).unwrap().0;
        assert!(super::raise_open_files().unwrap() >= before);
        assert!(super::open_files() >= before);
    }
}
