//! A small QMP client: QEMU's JSON control protocol over its Unix socket (`-qmp unix:PATH`).
//!
//! One command at a time, each with an `id` that its answer must echo. The greeting is read and
//! capabilities are negotiated in [`QmpClient::connect`]. Asynchronous events met while waiting
//! for an answer are kept (at most [`MAX_EVENTS`], the oldest dropped first) for
//! [`QmpClient::take_events`]. Every line is bounded ([`MAX_LINE_BYTES`]), every read has a
//! deadline, and an answer that is neither `return` nor `error`, or that answers another id, is
//! refused with a typed [`QmpError`].
//!
//! [`MigrationInfo`] is `query-migrate`'s answer, the figures QEMU reports about a migration.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};
use thiserror::Error;

/// The longest line accepted from QEMU.
pub const MAX_LINE_BYTES: usize = 1 << 20;
/// Events kept between two [`QmpClient::take_events`].
pub const MAX_EVENTS: usize = 256;
/// How long one answer may take unless the caller says otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a QMP exchange failed.
#[derive(Debug, Error)]
pub enum QmpError {
    /// The socket could not be reached, read or written.
    #[error("QMP socket {path}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// QEMU closed the socket.
    #[error("QMP socket {path} closed")]
    Closed {
        /// The socket.
        path: PathBuf,
    },
    /// A line longer than [`MAX_LINE_BYTES`].
    #[error("QMP line over {limit} bytes")]
    LineTooLong {
        /// [`MAX_LINE_BYTES`].
        limit: usize,
    },
    /// A line that is not a JSON object, or that is neither a greeting, an event nor an answer.
    #[error("malformed QMP message: {line}")]
    Malformed {
        /// The line (its first 200 characters).
        line: String,
    },
    /// The first line was not the `{"QMP": ...}` greeting.
    #[error("no QMP greeting: {line}")]
    Greeting {
        /// The line (its first 200 characters).
        line: String,
    },
    /// An answer to another command.
    #[error("QMP answer with id {got}, expected {expected}")]
    WrongId {
        /// This command's id.
        expected: u64,
        /// The answer's id.
        got: String,
    },
    /// QEMU refused the command.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// QEMU's error class (`GenericError`, `CommandNotFound`, ...).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// The answer did not have the shape the command documents.
    #[error("QMP {command}: unexpected answer {answer}")]
    Unexpected {
        /// The command.
        command: String,
        /// The answer (its first 200 characters).
        answer: String,
    },
}

/// A connected, negotiated QMP session.
#[derive(Debug)]
pub struct QmpClient {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    events: VecDeque<Value>,
    /// QEMU's version from the greeting, `major.minor.micro`.
    version: String,
}

fn clip(s: &str) -> String {
    s.chars().take(200).collect()
}

impl QmpClient {
    /// Connects to `path`, reads the greeting and negotiates capabilities (none asked).
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        Self::over(stream, path)
    }

    /// The same over a stream already connected (tests give it a fake QEMU).
    pub fn over(stream: UnixStream, path: &Path) -> Result<Self, QmpError> {
        let io = |source| QmpError::Io {
            path: path.to_path_buf(),
            source,
        };
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut client = Self {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            next_id: 1,
            events: VecDeque::new(),
            version: String::new(),
        };
        let greeting = client.read_message()?;
        let qmp = greeting.get("QMP").ok_or_else(|| QmpError::Greeting {
            line: clip(&greeting.to_string()),
        })?;
        let v = &qmp["version"]["qemu"];
        client.version = format!("{}.{}.{}", v["major"], v["minor"], v["micro"]);
        client.execute("qmp_capabilities", None)?;
        Ok(client)
    }

    /// QEMU's version, from the greeting.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Runs `command` with `arguments` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_within(command, arguments, DEFAULT_TIMEOUT)
    }

    /// [`Self::execute`] with its own deadline for the answer.
    pub fn execute_within(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut line = request.to_string();
        line.push('\n');
        let path = self.path.clone();
        let io = |source| QmpError::Io { path, source };
        self.writer.write_all(line.as_bytes()).map_err(io)?;
        self.reader
            .get_ref()
            .set_read_timeout(Some(timeout))
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let message = self.read_message()?;
            if message.get("event").is_some() {
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(message);
                continue;
            }
            match message.get("id") {
                Some(got) if got.as_u64() == Some(id) => {}
                Some(got) => {
                    return Err(QmpError::WrongId {
                        expected: id,
                        got: got.to_string(),
                    })
                }
                None => {
                    return Err(QmpError::Malformed {
                        line: clip(&message.to_string()),
                    })
                }
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: error["class"].as_str().unwrap_or("?").to_string(),
                    desc: error["desc"].as_str().unwrap_or("?").to_string(),
                });
            }
            return Err(QmpError::Malformed {
                line: clip(&message.to_string()),
            });
        }
    }

    /// The events received so far, oldest first; the client keeps none after.
    pub fn take_events(&mut self) -> Vec<Value> {
        self.events.drain(..).collect()
    }

    /// `query-migrate`, typed.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let answer = self.execute("query-migrate", None)?;
        serde_json::from_value(answer.clone()).map_err(|_| QmpError::Unexpected {
            command: "query-migrate".into(),
            answer: clip(&answer.to_string()),
        })
    }

    /// `query-status`'s `status` (`running`, `inmigrate`, `postmigrate`, `paused`, ...).
    pub fn run_state(&mut self) -> Result<String, QmpError> {
        let answer = self.execute("query-status", None)?;
        answer["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Unexpected {
                command: "query-status".into(),
                answer: clip(&answer.to_string()),
            })
    }

    /// Reads one line and parses it as a JSON object.
    fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut buf = Vec::new();
        let read = (&mut self.reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|source| QmpError::Io {
                path: self.path.clone(),
                source,
            })?;
        if read == 0 {
            return Err(QmpError::Closed {
                path: self.path.clone(),
            });
        }
        if buf.len() > MAX_LINE_BYTES {
            return Err(QmpError::LineTooLong { limit: MAX_LINE_BYTES });
        }
        let text = String::from_utf8_lossy(&buf);
        match serde_json::from_slice::<Value>(&buf) {
            Ok(v) if v.is_object() => Ok(v),
            _ => Err(QmpError::Malformed {
                line: clip(text.trim_end()),
            }),
        }
    }
}

/// `query-migrate`'s answer: the fields this project reads. Times are milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// `setup`, `active`, `device`, `completed`, `failed`, `cancelled`, ...; absent before any
    /// migration.
    pub status: Option<String>,
    /// From `migrate` until now or the end.
    pub total_time: Option<u64>,
    /// The time the VM was stopped (completed only).
    pub downtime: Option<u64>,
    /// The downtime QEMU expected (active only).
    pub expected_downtime: Option<u64>,
    /// The setup phase.
    pub setup_time: Option<u64>,
    /// RAM figures.
    pub ram: Option<RamInfo>,
    /// Why it failed.
    pub error_desc: Option<String>,
    /// Incoming side: where it listens (for `tcp:HOST:0`, the port QEMU chose).
    pub socket_address: Option<Vec<SocketAddress>>,
}

/// `query-migrate`'s `ram`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamInfo {
    /// Bytes sent.
    pub transferred: u64,
    /// RAM size.
    pub total: u64,
    /// Pages sent whole.
    #[serde(default)]
    pub normal: u64,
    /// Zero pages, sent as a flag.
    #[serde(default)]
    pub duplicate: u64,
    /// Dirty-bitmap syncs (about the rounds).
    #[serde(default)]
    pub dirty_sync_count: u64,
    /// QEMU's own throughput figure, megabits per second.
    #[serde(default)]
    pub mbps: f64,
}

/// One entry of `socket-address`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SocketAddress {
    /// `inet`, `unix`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The host, for `inet`.
    pub host: Option<String>,
    /// The port, for `inet` (QMP sends it as a string).
    pub port: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_query_migrate_answer_reads() {
        let answer = json!({
            "status": "completed", "total-time": 2300, "downtime": 31, "setup-time": 4,
            "ram": {"transferred": 1_000_000, "total": 1 << 30, "normal": 200, "duplicate": 10,
                    "dirty-sync-count": 5, "mbps": 900.5, "remaining": 0}
        });
        let info: MigrationInfo = serde_json::from_value(answer).unwrap();
        assert_eq!(info.status.as_deref(), Some("completed"));
        assert_eq!(info.downtime, Some(31));
        assert_eq!(info.ram.unwrap().dirty_sync_count, 5);
    }
}
