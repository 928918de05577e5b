//! The `staged` command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use staged::config::{Config, redact_url};
use staged::store::{Store, StoreOptions};
use staged::{app, systemd, telemetry};

#[derive(Parser)]
#[command(
    name = "staged",
    version,
    about = "Stages telescope data from tape onto disk, on request"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole pipeline on this machine with simulators (SQLite, Scout simulator,
    /// mock Kafka broker, metadata service, callback receiver) and sample jobs.
    Demo {
        /// Where the daemon's API listens.
        #[arg(long, default_value = "127.0.0.1:8000")]
        listen: SocketAddr,
    },
    /// Run the daemon.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Listen on this address instead of the config's `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        #[command(flatten)]
        common: Common,
    },
    /// Turn the original service's `.envrc` into a staged config: the TOML goes to
    /// stdout (or --out), the variables to set and anything to check to stderr.
    ImportEnv {
        /// The `.envrc` (direnv syntax: `export NAME=value`, quotes, comments).
        file: PathBuf,
        /// Write the config here instead of stdout (refused if it exists).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Check a config file and print the effective configuration, secrets redacted.
    CheckConfig {
        #[command(flatten)]
        common: Common,
    },
    /// Work with telescope adapters (WebAssembly components).
    #[command(subcommand)]
    Adapter(AdapterCommand),
}

#[derive(Subcommand)]
enum AdapterCommand {
    /// Load an adapter, print its info and observation schema, and run a self-test that
    /// needs no network. Exits non-zero if the file is not a working adapter.
    Inspect {
        /// The adapter's `.wasm` file.
        file: PathBuf,
        /// Take limits and `[adapter.settings]` from this config file.
        #[arg(long, short, env = "STAGED_CONFIG")]
        config: Option<PathBuf>,
    },
}

#[derive(Args)]
struct Common {
    /// The TOML config file; without it, the built-in defaults (SQLite `staged.db`,
    /// 127.0.0.1:8000).
    #[arg(long, short, env = "STAGED_CONFIG")]
    config: Option<PathBuf>,
    /// Use this database URL instead of the config's `database.url`.
    #[arg(long)]
    database: Option<String>,
}

impl Common {
    fn load(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        if let Some(url) = &self.database {
            let mut text = String::new();
            text.push_str("[database]\nurl = ");
            text.push_str(&toml::Value::String(url.clone()).to_string());
            // Checked by the same rules as the file.
            Config::parse(&text).context("--database")?;
            config.database.url = url.clone();
        }
        Ok(config)
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Demo { listen } => staged::demo::run(listen).await,
        Command::Serve { common, listen } => {
            let mut config = common.load()?;
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            telemetry::init(&config.logging);
            tracing::info!(
                version = env!("CARGO_PKG_VERSION"),
                database = %redact_url(&config.database.url),
                "starting"
            );
            let server = app::start(&config).await?;
            systemd::ready();
            let watchdog = systemd::start_watchdog();
            app::shutdown_signal().await;
            systemd::stopping();
            tracing::info!("stopping: finishing in-flight requests");
            server.stop().await?;
            if let Some(watchdog) = watchdog {
                watchdog.abort();
            }
            tracing::info!("stopped");
            Ok(())
        }
        Command::Migrate { common } => {
            let config = common.load()?;
            telemetry::init(&config.logging);
            let opts = StoreOptions::from_config(&config.database, &config.jobs);
            let backend = Store::migrate_only(&opts)
                .await
                .with_context(|| format!("migrating {}", redact_url(&config.database.url)))?;
            println!("migrations applied ({backend})");
            Ok(())
        }
        Command::Adapter(AdapterCommand::Inspect { file, config }) => {
            let config = match config {
                Some(path) => Config::load(&path)?,
                None => Config::default(),
            };
            let lines = staged::adapter::inspect(&file, &config.adapter).await?;
            for line in lines {
                println!("{line}");
            }
            Ok(())
        }
        Command::ImportEnv { file, out } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let vars =
                staged::import_env::parse(&text).with_context(|| file.display().to_string())?;
            let imported =
                staged::import_env::import(&vars).with_context(|| file.display().to_string())?;
            match &out {
                Some(path) => {
                    use std::io::Write as _;
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(path)
                        .with_context(|| format!("creating {}", path.display()))?;
                    f.write_all(imported.toml.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{}", imported.toml),
            }
            if !imported.set_env.is_empty() {
                eprintln!(
                    "secrets are not copied; set these where the daemon runs (e.g. /etc/staged/staged.env):"
                );
                for (new, old) in &imported.set_env {
                    eprintln!("  {new}  (the value of {old})");
                }
            }
            for note in &imported.notes {
                eprintln!("note: {note}");
            }
            if !imported.unknown.is_empty() {
                eprintln!(
                    "not imported, unknown variables: {}",
                    imported.unknown.join(", ")
                );
            }
            Ok(())
        }
        Command::CheckConfig { common } => {
            let config = common.load()?;
            // The files are read as `serve` reads them, so a bad one fails here, not at start.
            if let Some(tls) = &config.server.tls {
                let file = common.config.as_deref().unwrap_or(Path::new("")).display();
                staged::api::tls::Tls::from_config(tls)
                    .with_context(|| format!("[server.tls] in config file {file}"))?;
            }
            print!("{}", config.redacted_toml()?);
            for warning in config.warnings() {
                eprintln!("warning: {warning}");
            }
            Ok(())
        }
    }
}
