//! The physical baselines every bench figure is divided by, measured in the same run: a memcpy
//! of the same bytes, and a plain TCP copy of the same bytes between two processes on loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Instant;

pub use migratory::telemetry::baseline::memcpy_bytes_per_sec;

/// Bytes per second of `bytes` written over one loopback TCP connection to a child process
/// (`migratory bench-sink`) that reads them all; the clock stops when the child has them.
pub fn tcp_bytes_per_sec(bytes: u64) -> Result<f64, String> {
    let exe = std::env::current_exe().map_err(|e| format!("own executable: {e}"))?;
    let mut child = Command::new(exe)
        .arg("bench-sink")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the TCP sink: {e}"))?;
    let mut out = BufReader::new(child.stdout.take().ok_or("sink stdout")?);
    let mut line = String::new();
    out.read_line(&mut line).map_err(|e| format!("sink address: {e}"))?;
    let addr = line.trim().to_string();
    let mut s = TcpStream::connect(&addr).map_err(|e| format!("connect to sink {addr}: {e}"))?;
    let chunk = vec![0x5au8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        s.write_all(&chunk[..n]).map_err(|e| format!("write to sink: {e}"))?;
        sent += n as u64;
    }
    drop(s);
    line.clear();
    out.read_line(&mut line).map_err(|e| format!("sink count: {e}"))?;
    let elapsed = t.elapsed().as_secs_f64();
    let _ = child.wait();
    let got: u64 = line.trim().parse().map_err(|_| format!("sink said {line:?}"))?;
    if got != bytes {
        return Err(format!("sink received {got} of {bytes} bytes"));
    }
    Ok(bytes as f64 / elapsed)
}

/// The child side of [`tcp_bytes_per_sec`]: prints its address, reads one connection to its
/// end, prints the byte count.
pub fn sink() -> Result<(), String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    println!("{addr}");
    std::io::stdout().flush().map_err(|e| e.to_string())?;
    let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got += n as u64,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    println!("{got}");
    Ok(())
}
