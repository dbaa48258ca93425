//! Serial ports for the station: `serialport` is blocking, so each port gets
//! two threads that copy between it and one end of an in-memory async pipe;
//! the station sees the other end as any byte stream.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};

/// Opens `path` at `baud` (8N1, no flow control) and returns an async byte
/// stream bridged to it.
pub fn open(path: &str, baud: u32) -> Result<DuplexStream, String> {
    let port = serialport::new(path, baud)
        .timeout(Duration::from_millis(100))
        .open()
        .map_err(|e| format!("opening serial port {path}: {e}"))?;
    bridge(port, path)
}

/// Bridges an opened port (its read timeout set; a timeout is not an error)
/// to an async byte stream, with one reader and one writer thread. Must be
/// called inside a tokio runtime. `path` names the port in messages.
pub fn bridge(port: Box<dyn serialport::SerialPort>, path: &str) -> Result<DuplexStream, String> {
    let mut reader = port
        .try_clone()
        .map_err(|e| format!("serial port {path}: {e}"))?;
    let mut writer = port;
    let (station_end, bridge_end) = tokio::io::duplex(16 * 1024);
    let (mut from_station, mut to_station) = tokio::io::split(bridge_end);
    let runtime = tokio::runtime::Handle::current();
    let name = path.to_owned();
    // Port → station.
    let inbound = runtime.clone();
    std::thread::Builder::new()
        .name(format!("serial-rx {name}"))
        .spawn(move || {
            let mut buf = [0u8; 1024];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => return,
                    Ok(n) => {
                        if inbound.block_on(to_station.write_all(&buf[..n])).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                    Err(e) => {
                        tracing::warn!(port = %name, error = %e, "serial read failed");
                        return;
                    }
                }
            }
        })
        .map_err(|e| format!("serial port {path}: {e}"))?;
    // Station → port.
    let name = path.to_owned();
    std::thread::Builder::new()
        .name(format!("serial-tx {name}"))
        .spawn(move || {
            let mut buf = [0u8; 1024];
            loop {
                let n = match runtime.block_on(from_station.read(&mut buf)) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if let Err(e) = writer.write_all(&buf[..n]).and_then(|()| writer.flush()) {
                    tracing::warn!(port = %name, error = %e, "serial write failed");
                    return;
                }
            }
        })
        .map_err(|e| format!("serial port {path}: {e}"))?;
    Ok(station_end)
}
