//! The single-copy baseline: the same bytes sent once over loopback TCP into a file
//! and fsynced, by the simplest program that does it. This is the floor a sync
//! service is measured against on this machine, in the same run.
//!
//! One connection carries any number of files: `u32` name length, name, `u64`
//! size, bytes. The receiver writes each file, fsyncs it, and answers one byte;
//! a name length of 0 ends the connection. The sender may run ahead of the
//! answers (a burst) or wait for each (a latency).

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

fn receive(listener: TcpListener, dest: PathBuf) -> io::Result<()> {
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
        let mut f = File::create(dest.join(&name))?;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            r.read_exact(&mut buf[..n])?;
            f.write_all(&buf[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
        ack.write_all(&[1])?;
    }
}

impl Copier {
    /// Starts a receiver on 127.0.0.2 writing into `dest` (created), and connects
    /// to it from 127.0.0.1.
    pub fn start(dest: &Path) -> io::Result<Copier> {
        fs::create_dir_all(dest)?;
        let listener = TcpListener::bind((Ipv4Addr::new(127, 0, 0, 2), 0))?;
        let addr = listener.local_addr()?;
        let d = dest.to_path_buf();
        let receiver =
            std::thread::Builder::new().name("baseline-receiver".into()).spawn(move || receive(listener, d))?;
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
}
