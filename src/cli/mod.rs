//! The command-line client of the daemon's HTTP/JSON control API.
//!
//! `migratory vm create|list|delete`, `migratory migrate`, `migratory status` and
//! `migratory cancel` each send one request (or, with `migrate --wait`, a request and then a
//! status poll) to the daemon at `--api URL` (else `$MIGRATORY_API`, else [`DEFAULT_API`]) and
//! print the answer for a human, or as raw JSON with `--json` where a script wants it. Over TCP
//! each request carries the daemon's bearer token (see [`ApiArgs`]); over a Unix socket
//! (`--api unix:PATH`) none is needed.
//!
//! * [`client`]: the blocking HTTP/1.1 transport and its errors; reach for it to add a request.
//! * [`commands`]: what each subcommand sends and how its answer is printed.
//! * [`token`]: the API token file, shared with `serve`, which creates it.
//! * [`simulate`]: `migratory simulate`, the datacenter model. It talks to no daemon, but it
//!   lives here because, like the clients, it only reads a file, calls the library and prints.
//!
//! Errors end as exactly one `migratory: <message>` line on stderr and a failure exit status, so
//! scripts can rely on stdout holding only results.

pub(crate) mod client;
mod commands;
mod operator;
pub mod simulate;
pub mod token;

use std::error::Error;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use migratory::engine::Priority;
use migratory::protocol::{Algorithm, CompressionChoice};
use migratory::units::ByteSize;
use migratory::vmm::Pattern;

/// Where the daemon listens when neither `--api` nor `$MIGRATORY_API` says otherwise.
pub const DEFAULT_API: &str = "http://127.0.0.1:8000";

/// The environment variable read when `--api` is absent.
const API_ENV: &str = "MIGRATORY_API";

/// Which daemon to talk to, and how to prove the right to; flattened into every client
/// subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiArgs {
    /// The daemon's control API: http://HOST:PORT[/prefix], or unix:PATH for its Unix socket
    /// [env: MIGRATORY_API] [default: http://127.0.0.1:8000].
    // Read by hand: clap's `env` feature is not enabled, and one variable does not justify it.
    #[arg(long, value_name = "URL")]
    pub api: Option<String>,
    /// File holding the daemon's API token [default: $MIGRATORY_API_TOKEN (the token itself),
    /// else the file $MIGRATORY_API_TOKEN_FILE, else ~/.migratory/api-token].
    #[arg(long, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// For an https:// API (a daemon run with --api-tls): this client's PEM certificate,
    /// signed by the cluster CA; with --tls-key and --tls-ca.
    #[arg(long, value_name = "PATH", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// This client's PEM private key.
    #[arg(long, value_name = "PATH", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// The cluster CA's PEM certificate, which signed the daemon's.
    #[arg(long, value_name = "PATH", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl ApiArgs {
    /// The base URL: `--api`, else `$MIGRATORY_API`, else [`DEFAULT_API`].
    fn base_url(&self) -> String {
        resolve_api(self.api.as_deref(), std::env::var(API_ENV).ok())
    }

    /// The client's TLS identity, when `--tls-*` are given.
    fn tls(&self) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, migratory::link::tls::TlsError> {
        match (&self.tls_cert, &self.tls_key, &self.tls_ca) {
            (Some(c), Some(k), Some(ca)) => Ok(Some(migratory::link::tls::TlsSetup::from_pem_files(c, k, ca)?.client)),
            _ => Ok(None),
        }
    }

    /// The token to send, if any: see [`resolve_token`].
    fn token(&self, unix: bool) -> Result<Option<String>, token::TokenError> {
        resolve_token(
            self.token_file.as_deref(),
            std::env::var(token::TOKEN_ENV).ok(),
            token::default_path(),
            unix,
        )
    }
}

/// `--token-file`, else a non-empty `$MIGRATORY_API_TOKEN`, else the default token file if it
/// exists. Over a Unix socket the default file is not consulted: the socket needs no token, and
/// a user who may use it need not be able to read the file.
fn resolve_token(
    flag: Option<&Path>,
    env: Option<String>,
    default: Option<PathBuf>,
    unix: bool,
) -> Result<Option<String>, token::TokenError> {
    if let Some(path) = flag {
        return token::read(path).map(Some);
    }
    if let Some(text) = env.filter(|t| !t.trim().is_empty()) {
        return token::parse(&text, token::TOKEN_ENV).map(Some);
    }
    let Some(path) = default.filter(|_| !unix) else {
        return Ok(None);
    };
    match token::read(&path) {
        Ok(t) => Ok(Some(t)),
        // No daemon of this user made one: send none, and let the daemon say it is missing.
        Err(token::TokenError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// `flag`, else a non-empty `env`, else [`DEFAULT_API`].
fn resolve_api(flag: Option<&str>, env: Option<String>) -> String {
    match (flag, env) {
        (Some(url), _) => url.to_string(),
        (None, Some(url)) if !url.trim().is_empty() => url,
        (None, _) => DEFAULT_API.to_string(),
    }
}

/// The subcommands that drive a running daemon through its control API.
#[derive(Debug, clap::Subcommand)]
pub enum ClientCommand {
    /// Create, list or delete VMs on the daemon's host.
    Vm {
        /// What to do with VMs.
        #[command(subcommand)]
        action: VmAction,
    },
    /// Start a live migration of a VM to a peer host.
    Migrate(Box<MigrateArgs>),
    /// Show one migration, or all of them.
    Status {
        /// The migration to show; all of them when absent.
        id: Option<u64>,
        /// Print the daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Cancel a migration (it takes effect only before commitment).
    Cancel {
        /// The migration to cancel.
        id: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Move every VM off the daemon's host to peers, one at a time (held copies stay).
    Drain(operator::DrainArgs),
    /// Shut the daemon down as SIGTERM does (finish, evacuate with --drain-to, exit when empty).
    Shutdown {
        /// End now, destroying any VM still here (as a second SIGTERM does).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `migratory vm ...`.
#[derive(Debug, clap::Subcommand)]
pub enum VmAction {
    /// Create a sim VM on the daemon's host.
    Create(CreateVmArgs),
    /// List the VMs on the daemon's host.
    List {
        /// Print the daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a VM from the daemon's host.
    Delete {
        /// The VM to delete.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Run a held copy (`committed-unconfirmed`) again. Fenced: the peer is asked first, and a
    /// peer that cannot be asked refuses it unless --peer-is-dead.
    Resume {
        /// The held VM.
        id: String,
        /// The peer is known to be dead: resume even if it cannot be asked.
        #[arg(long)]
        peer_is_dead: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Destroy a held copy (`committed-unconfirmed`, `stale`, `unverified`, `awaiting-pages`).
    Discard {
        /// The held VM.
        id: String,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// `migratory vm create`.
#[derive(Debug, clap::Args)]
pub struct CreateVmArgs {
    /// Name of the new VM.
    pub id: String,
    /// Guest RAM.
    #[arg(long, default_value = "256MiB")]
    pub memory: ByteSize,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub vcpus: u32,
    /// Guest dirtying rate (bytes of pages per second; 0 = idle).
    #[arg(long, default_value = "0")]
    pub dirty_rate: ByteSize,
    /// Working set the writer dirties (the hot set for `hot-set`).
    #[arg(long, default_value = "64MiB")]
    pub working_set: ByteSize,
    /// uniform, hot-set or sequential.
    #[arg(long, default_value = "hot-set")]
    pub pattern: Pattern,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// `migratory migrate`.
#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The VM to migrate.
    pub vm: String,
    /// The peer host's migration listener (with --recover: where the target listens now, if it
    /// moved).
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_peer, required_unless_present_any = ["recover", "to_qemu"])]
    pub to: Option<String>,
    /// Move the VM to a QEMU started with `-incoming tcp:HOST:PORT` (same machine type and RAM
    /// size; see README, "Moving VMs to and from QEMU"), in QEMU's own migration stream, and
    /// wait until QEMU runs it.
    #[arg(long, value_name = "IP:PORT", conflicts_with_all = ["to", "recover", "wait"])]
    pub to_qemu: Option<std::net::SocketAddr>,
    /// With --to-qemu: the machine type the QEMU runs.
    #[arg(long, value_name = "TYPE", requires = "to_qemu", default_value = "pc-i440fx-7.2")]
    pub qemu_machine: String,
    /// With --to-qemu: the QEMU's accelerator (TCG keeps the task register in a form of its
    /// own).
    #[arg(long, value_name = "kvm|tcg", requires = "to_qemu", default_value = "kvm", value_parser = ["kvm", "tcg"])]
    pub qemu_accel: String,
    /// Carry on the post-copy pull of a held `stale` copy whose recovery timed out.
    #[arg(long)]
    pub recover: bool,
    /// stop-and-copy, precopy, postcopy, hybrid, auto or random.
    #[arg(long, default_value = "precopy")]
    pub algorithm: Algorithm,
    /// Parallel data streams (1 to 255).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..))]
    pub streams: u8,
    /// Bandwidth cap (e.g. 1GB for 1 GB/s); unlimited by default.
    #[arg(long)]
    pub bandwidth: Option<ByteSize>,
    /// Downtime the switchover may take, in milliseconds.
    #[arg(long, default_value_t = 300.0)]
    pub downtime_limit_ms: f64,
    /// When stop-and-copy and pre-copy compare page digests: after-activation (no hashing in
    /// the downtime) or before-commit (a difference rolls back) [daemon default:
    /// after-activation].
    #[arg(long)]
    pub verify: Option<migratory::engine::verify::VerifyMode>,
    /// Poll until the migration ends, print its final line, and exit non-zero unless it completed.
    #[arg(long)]
    pub wait: bool,
    /// Faults to inject: `KIND[:ARG][@WHEN],...` (see the README).
    #[arg(long, value_name = "SPEC")]
    pub fault: Option<String>,
    /// Post-copy: seconds to keep reconnecting after the link fails in the pull phase (0: no
    /// recovery).
    #[arg(long, value_name = "SECONDS", default_value_t = 60.0)]
    pub recovery_timeout: f64,
    /// With --wait or --to-qemu: print the final report as one JSON object instead of the
    /// summary line.
    #[arg(long)]
    pub json: bool,
    /// Page compression where both hosts offer it: off, lz4, xbzrle, both or auto (the
    /// daemon's default, auto, uses what won on the benchmark).
    #[arg(long)]
    pub compression: Option<CompressionChoice>,
    /// Most page content the source keeps as XBZRLE delta bases (e.g. 64MiB, the default).
    #[arg(long, value_name = "SIZE")]
    pub xbzrle_cache: Option<ByteSize>,

    // Quality of service.
    /// Priority class: low, normal (the daemon's default) or high. The host's outgoing queue
    /// serves higher classes first, and its bandwidth budget is shared by weights 1, 2 and 4.
    #[arg(long)]
    pub priority: Option<Priority>,
    /// Bandwidth of the host's budget assured to this migration while it sends (e.g. 50MB for
    /// 50 MB/s); refused if other migrations' floors leave less.
    #[arg(long, value_name = "RATE")]
    pub min_bandwidth: Option<ByteSize>,
    // The target's network announcement after activation (QEMU's announce parameters; the
    // daemon's defaults, QEMU's, for any left out).
    /// Rounds of RARP and gratuitous ARP frames the target sends (0 to 1000) [default: 5].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub announce_rounds: Option<u32>,
    /// Wait after the first round, in ms (0 to 100000) [default: 50].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub announce_initial_ms: Option<u32>,
    /// Longest wait between rounds, in ms (0 to 100000) [default: 550].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(0..=100_000))]
    pub announce_max_ms: Option<u32>,
    /// How much each wait grows, in ms (1 to 10000) [default: 100].
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub announce_step_ms: Option<u32>,
    /// Seed of `--algorithm random`'s pick, to replay one (default: from the OS; the report
    /// records it).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Deadline for the total time (e.g. 5s, 500ms, 2m): the migration switches to post-copy
    /// or raises its pace where that meets it; the report says whether it was met.
    #[arg(long, value_name = "DURATION", value_parser = parse_deadline)]
    pub deadline: Option<f64>,
    #[command(flatten)]
    pub api: ApiArgs,
}

/// A duration with a unit, `500ms`, `5s` or `2m`, in seconds; above zero, at most a week.
fn parse_deadline(s: &str) -> Result<f64, String> {
    let bad = || format!("{s:?} is not a duration such as 500ms, 5s or 2m");
    let (number, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3600.0)
    } else {
        return Err(bad());
    };
    let seconds = number.trim().parse::<f64>().map_err(|_| bad())? * scale;
    if !(seconds > 0.0 && seconds <= 7.0 * 86_400.0) {
        return Err(format!("deadline {s:?} must be above zero and at most a week"));
    }
    Ok(seconds)
}

/// Accepts `HOST:PORT` (`[v6]:PORT` too); the daemon resolves the host.
fn parse_peer(s: &str) -> Result<String, String> {
    let bad = || format!("{s:?} is not HOST:PORT");
    let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || host.contains(char::is_whitespace) || !port.parse::<u16>().is_ok_and(|p| p != 0) {
        return Err(bad());
    }
    Ok(s.to_string())
}

/// Runs one client subcommand against the daemon. Prints the result on stdout; on any failure
/// prints one `migratory: <message>` line on stderr and returns [`ExitCode::FAILURE`].
pub fn run_client(cmd: ClientCommand) -> ExitCode {
    match commands::execute(cmd) {
        Ok(text) => print_stdout(&text),
        Err(err) => {
            // `migrate --wait` that did not complete still owes stdout its final line.
            if let Some(text) = err.stdout() {
                if print_stdout(text) != ExitCode::SUCCESS {
                    return ExitCode::FAILURE;
                }
            }
            eprintln!("{}", error_line(&err));
            ExitCode::FAILURE
        }
    }
}

fn print_stdout(text: &str) -> ExitCode {
    let mut out = io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("migratory: cannot write to stdout: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `migratory: ` and the error with its sources, flattened to a single line because callers
/// (and scripts) count on exactly one line per failure, even if the daemon's text had newlines.
fn error_line(err: &dyn Error) -> String {
    format!("migratory: {}", error_text(err))
}

/// The error and its sources as one line, `: `-separated, control characters blanked; for
/// errors the daemon prints too.
pub fn error_text(err: &dyn Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(subcommand)]
        cmd: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<ClientCommand, clap::Error> {
        TestCli::try_parse_from(std::iter::once("migratory").chain(args.iter().copied())).map(|c| c.cmd)
    }

    #[test]
    fn test_command_definitions_are_consistent() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn test_migrate_defaults_and_flags_parse() {
        let cmd = parse(&["migrate", "vm1", "--to", "127.0.0.1:7001"]).unwrap();
        let ClientCommand::Migrate(args) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(args.vm, "vm1");
        assert_eq!(args.to.as_deref(), Some("127.0.0.1:7001"));
        assert_eq!(args.algorithm, Algorithm::Precopy);
        assert_eq!((args.streams, args.bandwidth, args.downtime_limit_ms), (2, None, 300.0));
        assert!(!args.wait && args.api.api.is_none());

        let cmd = parse(&[
            "migrate",
            "vm1",
            "--to",
            "[::1]:7001",
            "--algorithm",
            "auto",
            "--bandwidth",
            "1GB",
            "--wait",
            "--api",
            "http://h:1",
        ])
        .unwrap();
        let ClientCommand::Migrate(args) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(args.algorithm, Algorithm::Auto);
        assert_eq!(args.bandwidth, Some(ByteSize(1_000_000_000)));
        assert_eq!((args.compression, args.xbzrle_cache), (None, None));
        assert!(args.wait);
        assert_eq!(args.api.api.as_deref(), Some("http://h:1"));
    }

    #[test]
    fn test_random_seed_and_deadline_flags_parse() {
        let cmd = parse(&[
            "migrate",
            "vm1",
            "--to",
            "h:1",
            "--algorithm",
            "random",
            "--seed",
            "42",
            "--deadline",
            "1.5s",
        ])
        .unwrap();
        let ClientCommand::Migrate(args) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(args.algorithm, Algorithm::Random);
        assert_eq!((args.seed, args.deadline), (Some(42), Some(1.5)));
        assert_eq!(parse_deadline("500ms"), Ok(0.5));
        assert_eq!(parse_deadline("2m"), Ok(120.0));
        for bad in ["5", "0s", "-1s", "fast", "9999h", "NaNs"] {
            assert!(parse_deadline(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_compression_flags_parse() {
        let cmd = parse(&[
            "migrate",
            "vm1",
            "--to",
            "h:1",
            "--compression",
            "both",
            "--xbzrle-cache",
            "16MiB",
        ])
        .unwrap();
        let ClientCommand::Migrate(args) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(args.compression, Some(CompressionChoice::Both));
        assert_eq!(args.xbzrle_cache, Some(ByteSize(16 << 20)));
    }

    #[test]
    fn test_announce_flags_parse() {
        let cmd = parse(&[
            "migrate",
            "vm1",
            "--to",
            "h:1",
            "--announce-rounds",
            "3",
            "--announce-initial-ms",
            "10",
            "--announce-max-ms",
            "200",
            "--announce-step-ms",
            "40",
        ])
        .unwrap();
        let ClientCommand::Migrate(args) = cmd else {
            panic!("{cmd:?}")
        };
        assert_eq!(
            (
                args.announce_rounds,
                args.announce_initial_ms,
                args.announce_max_ms,
                args.announce_step_ms
            ),
            (Some(3), Some(10), Some(200), Some(40))
        );
    }

    #[test]
    fn test_bad_arguments_are_rejected() {
        for bad in [
            &["migrate", "vm1"][..],
            &["migrate", "vm1", "--to", "nohost"],
            &["migrate", "vm1", "--to", ":7001"],
            &["migrate", "vm1", "--to", "h:0"],
            &["migrate", "vm1", "--to", "h:1", "--algorithm", "teleport"],
            &["migrate", "vm1", "--to", "h:1", "--streams", "0"],
            &["migrate", "vm1", "--to", "h:1", "--streams", "256"],
            &["migrate", "vm1", "--to", "h:1", "--compression", "gzip"],
            &["migrate", "vm1", "--to", "h:1", "--announce-rounds", "1001"],
            &["migrate", "vm1", "--to", "h:1", "--announce-step-ms", "0"],
            &["vm", "create", "vm1", "--memory", "lots"],
            &["vm", "create", "vm1", "--pattern", "zigzag"],
            &["status", "three"],
            &["cancel"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn test_vm_create_defaults_parse() {
        let cmd = parse(&["vm", "create", "vm1"]).unwrap();
        let ClientCommand::Vm {
            action: VmAction::Create(args),
        } = cmd
        else {
            panic!("{cmd:?}")
        };
        assert_eq!(args.id, "vm1");
        assert_eq!((args.memory, args.vcpus), (ByteSize(256 << 20), 2));
        assert_eq!((args.dirty_rate, args.working_set), (ByteSize(0), ByteSize(64 << 20)));
        assert_eq!(args.pattern, Pattern::HotSet);
    }

    #[test]
    fn test_api_flag_wins_over_env_which_wins_over_default() {
        assert_eq!(resolve_api(Some("http://a:1"), Some("http://b:2".into())), "http://a:1");
        assert_eq!(resolve_api(None, Some("http://b:2".into())), "http://b:2");
        assert_eq!(resolve_api(None, Some(" ".into())), DEFAULT_API);
        assert_eq!(resolve_api(None, None), DEFAULT_API);
    }

    #[test]
    fn test_token_flag_wins_over_env_which_wins_over_the_default_file() {
        let dir = std::env::temp_dir().join(format!("migratory-cli-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (flag, default) = (dir.join("flag"), dir.join("default"));
        let (t_flag, t_env, t_default) = ("f".repeat(32), "e".repeat(32), "d".repeat(32));
        std::fs::write(&flag, &t_flag).unwrap();
        std::fs::write(&default, &t_default).unwrap();
        let env = || Some(t_env.clone());
        let get = |f, e, d, unix| resolve_token(f, e, d, unix).unwrap();
        assert_eq!(
            get(Some(&flag), env(), Some(default.clone()), false),
            Some(t_flag.clone())
        );
        assert_eq!(get(Some(&flag), None, None, true), Some(t_flag));
        assert_eq!(get(None, env(), Some(default.clone()), false), Some(t_env));
        assert_eq!(
            get(None, Some(" ".into()), Some(default.clone()), false),
            Some(t_default)
        );
        assert_eq!(get(None, None, Some(default.clone()), true), None);
        assert_eq!(get(None, None, Some(dir.join("absent")), false), None);
        assert_eq!(get(None, None, None, false), None);
        assert!(resolve_token(Some(&dir.join("absent")), None, None, false).is_err());
        assert!(resolve_token(None, Some("short".into()), None, false).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn test_error_line_is_one_line_with_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer\nsecond line")]
        struct Outer(#[source] std::io::Error);
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(error_line(&err), "migratory: outer second line: inner");
    }
}
