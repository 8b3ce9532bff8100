//! The single-copy baseline: the same bytes sent once over loopback TCP into a file
//! and fsynced, by the simplest program that does it. This is the floor a sync
//! service is measured against on this machine, in the same run. The same done
//! several times at once ([`Copier::copy_at_once`]) shows what the one disk allows
//! for as many copies.
//!
//! One connection carries any number of files: `u32` name length, name, `u64`
//! size, bytes. The receiver writes each file, fsyncs it, and answers one byte;
//! a name length of 0 ends the connection. The sender may run ahead of the
//! answers (a burst) or wait for each (a latency).

use replibox_proto::durable::{drop_synced, WriteBehind};
use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long the receiver waits for the next bytes before giving up.
const IDLE: Duration = Duration::from_secs(120);

/// A sender connected to a receiver thread that writes into `dest`.
pub struct Copier {
    stream: BufWriter<TcpStream>,
    acks: TcpStream,
    receiver: Option<JoinHandle<io::Result<()>>>,
}

/// How the receiver writes a file.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Writes {
    /// Plain `write` calls, then the fsync: the simplest program.
    Plain,
    /// Through [`WriteBehind`], as replibox stores a large file: the kernel writes
    /// out and drops the pages as they come, so the fsync finds little left.
    Behind,
}

fn receive(listener: TcpListener, dest: PathBuf, writes: Writes) -> io::Result<()> {
    let (stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(IDLE))?;
    stream.set_nodelay(true)?;
    let mut ack = stream.try_clone()?;
    let mut r = BufReader::with_capacity(1 << 20, stream);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let mut len = [0u8; 4];
        r.read_exact(&mut len)?;
        let len = u32::from_be_bytes(len) as usize;
        if len == 0 {
            fs::File::open(&dest)?.sync_all()?;
            return Ok(());
        }
        let mut name = vec![0u8; len];
        r.read_exact(&mut name)?;
        let name = String::from_utf8(name).map_err(|_| io::Error::other("a name that is not UTF-8"))?;
        let mut size = [0u8; 8];
        r.read_exact(&mut size)?;
        let mut left = u64::from_be_bytes(size);
        let f = File::create(dest.join(&name))?;
        let mut behind = (writes == Writes::Behind).then(|| WriteBehind::new(&f));
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..n])?;
            match behind.as_mut() {
                Some(w) => w.write_all(&buf[..n])?,
                None => (&f).write_all(&buf[..n])?,
            }
            left -= n as u64;
        }
        f.sync_all()?;
        if behind.is_some() {
            drop_synced(&f);
        }
        ack.write_all(&[1])?;
    }
}

impl Copier {
    /// Starts a receiver on 127.0.0.2 writing plainly into `dest` (created), and
    /// connects to it from 127.0.0.1.
    pub fn start(dest: &Path) -> io::Result<Copier> {
        Copier::start_writing(dest, Writes::Plain)
    }

    /// [`Copier::start`], with the receiver writing as told.
    pub fn start_writing(dest: &Path, writes: Writes) -> io::Result<Copier> {
        fs::create_dir_all(dest)?;
        let listener = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0))?;
        let addr = listener.local_addr()?;
        let d = dest.to_path_buf();
        let receiver =
            std::thread::Builder::new().name("baseline-receiver".into()).spawn(move || receive(listener, d, writes))?;
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IDLE))?;
        let acks = stream.try_clone()?;
        Ok(Copier { stream: BufWriter::with_capacity(1 << 20, stream), acks, receiver: Some(receiver) })
    }

    /// Sends one file of `size` bytes read from `src`, without waiting for its answer.
    pub fn send(&mut self, name: &str, src: &mut dyn Read, size: u64) -> io::Result<()> {
        self.stream.write_all(&(name.len() as u32).to_be_bytes())?;
        self.stream.write_all(name.as_bytes())?;
        self.stream.write_all(&size.to_be_bytes())?;
        let copied = io::copy(&mut src.take(size), &mut self.stream)?;
        if copied != size {
            return Err(io::Error::other(format!("{name}: {copied} bytes read of {size}")));
        }
        Ok(())
    }

    /// Flushes what was sent and waits for `n` answers (each: a file fsynced).
    pub fn wait(&mut self, n: usize) -> io::Result<()> {
        self.stream.flush()?;
        let mut left = n;
        let mut buf = [0u8; 4096];
        while left > 0 {
            let got = self.acks.read(&mut buf[..left.min(4096)])?;
            if got == 0 {
                return Err(self.receiver_error("the receiver closed the connection"));
            }
            left -= got;
        }
        Ok(())
    }

    fn receiver_error(&mut self, what: &str) -> io::Error {
        match self.receiver.take().map(JoinHandle::join) {
            Some(Ok(Err(e))) => io::Error::other(format!("{what}: {e}")),
            _ => io::Error::other(what.to_string()),
        }
    }

    /// Sends one file and waits until it is fsynced; returns the time taken.
    pub fn copy_one(&mut self, name: &str, src: &mut dyn Read, size: u64) -> io::Result<Duration> {
        let t0 = Instant::now();
        self.send(name, src, size)?;
        self.wait(1)?;
        Ok(t0.elapsed())
    }

    /// Copies the file at `src` (`size` bytes) over `n` connections at once, each
    /// into a folder of its own under `dest` (named 1 to `n`) written behind, and
    /// returns the time until the last copy is fsynced. With `n` as the number of
    /// copies a sync service writes on this machine's one disk, this is about the
    /// least time the disk allows for them.
    pub fn copy_at_once(dest: &Path, n: usize, src: &Path, size: u64) -> io::Result<Duration> {
        let mut copiers = Vec::with_capacity(n);
        let mut sources = Vec::with_capacity(n);
        for i in 1..=n {
            copiers.push(Copier::start_writing(&dest.join(i.to_string()), Writes::Behind)?);
            sources.push(File::open(src)?);
        }
        let name = src.file_name().and_then(|n| n.to_str()).unwrap_or("copy").to_string();
        let start = std::sync::Barrier::new(n + 1);
        let (elapsed, copiers) = std::thread::scope(|scope| {
            let workers: Vec<_> = copiers
                .into_iter()
                .zip(sources)
                .map(|(mut c, mut f)| {
                    let (start, name) = (&start, &name);
                    scope.spawn(move || {
                        start.wait();
                        c.send(name, &mut f, size).and_then(|()| c.wait(1)).map(|()| c)
                    })
                })
                .collect();
            let t0 = Instant::now();
            start.wait();
            let done: Vec<io::Result<Copier>> = workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|_| Err(io::Error::other("a copying thread panicked"))))
                .collect();
            (t0.elapsed(), done)
        });
        for c in copiers {
            c?.finish()?;
        }
        Ok(elapsed)
    }

    /// Ends the connection; the receiver fsyncs the folder and stops.
    pub fn finish(mut self) -> io::Result<()> {
        self.stream.write_all(&0u32.to_be_bytes())?;
        self.stream.flush()?;
        match self.receiver.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            _ => Err(io::Error::other("the receiver thread panicked")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_arrive_whole_and_answered() {
        let dir = std::env::temp_dir().join(format!("replibox-bench-copy-{}", std::process::id()));
        let mut c = Copier::start(&dir).unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        c.copy_one("big", &mut &big[..], big.len() as u64).unwrap();
        for i in 0..20 {
            c.send(&format!("f{i}"), &mut &b"small"[..], 5).unwrap();
        }
        c.wait(20).unwrap();
        c.finish().unwrap();
        assert_eq!(fs::read(dir.join("big")).unwrap(), big);
        assert_eq!(fs::read(dir.join("f19")).unwrap(), b"small");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn copies_at_once_each_arrive_whole() {
        let dir = std::env::temp_dir().join(format!("replibox-bench-copies-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let src = dir.join("src.bin");
        fs::write(&src, &big).unwrap();
        Copier::copy_at_once(&dir.join("out"), 4, &src, big.len() as u64).unwrap();
        for i in 1..=4 {
            assert_eq!(fs::read(dir.join("out").join(i.to_string()).join("src.bin")).unwrap(), big, "copy {i}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
