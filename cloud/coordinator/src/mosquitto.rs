//! `tern broker mosquitto-config`: a Mosquitto setup for the fleet (TLS with
//! the fleet CA's client certificates only, the certificate's subject as
//! username and client id, each device kept to `tern/v1/<its id>/`).

use crate::cli::{Client, out as say};
use anyhow::{Context, Result};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The `tern broker` commands.
#[derive(Debug, clap::Subcommand)]
pub enum BrokerCmd {
    /// Write a Mosquitto configuration for the fleet into a folder:
    /// `mosquitto.conf` (a TLS listener requiring a certificate of the fleet
    /// CA, `use_identity_as_username`, `use_username_as_clientid`), `acl`
    /// (each device reads and writes under `tern/v1/<its id>/` only; the
    /// coordinator's client under `tern/v1/`), the CA certificate and a
    /// server certificate and key from the fleet CA. Start it with
    /// `mosquitto -c DIR/mosquitto.conf` and the coordinator with
    /// `tern serve --mqtt-url mqtts://HOST:PORT`.
    MosquittoConfig {
        /// The folder to write (made if missing; files in it are replaced).
        #[arg(long)]
        out: PathBuf,
        /// The address Mosquitto listens on.
        #[arg(long, default_value = "0.0.0.0:8883")]
        listen: SocketAddr,
        /// Extra DNS names or IPs for the broker's certificate (the fleet's
        /// MQTT clients check `broker.tern`, which it always carries).
        #[arg(long = "name")]
        names: Vec<String>,
    },
}

/// Runs a `tern broker` command.
pub fn run(client: &Client, cmd: BrokerCmd, json_out: bool) -> Result<()> {
    let BrokerCmd::MosquittoConfig { out, listen, names } = cmd;
    let issued: Value = client.send("POST", "/v1/broker/server-certificate", &json!({ "names": names }))?;
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    let out = out.canonicalize().with_context(|| format!("resolving {}", out.display()))?;
    let text = |key: &str| issued[key].as_str().map(str::to_owned).with_context(|| format!("no {key} in the answer"));
    let write = |name: &str, body: &str, secret: bool| -> Result<PathBuf> {
        let path = out.join(name);
        tern_durable::write_atomic(&path, body.as_bytes(), secret)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    let ca = write("ca.pem", &text("ca")?, false)?;
    let cert = write("server.pem", &text("cert")?, false)?;
    let key = write("server.key", &text("key")?, true)?;
    let acl = write("acl", ACL, false)?;
    let conf = write("mosquitto.conf", &config(listen, &ca, &cert, &key, &acl), false)?;
    if json_out {
        say(serde_json::to_string_pretty(&json!({
            "config": conf, "acl": acl, "ca": ca, "cert": cert, "key": key, "listen": listen,
        }))?);
    } else {
        say(format!("wrote {} (and acl, ca.pem, server.pem, server.key)", conf.display()));
        say(format!("start it:   mosquitto -c {}", conf.display()));
        say(format!("then:       tern serve --mqtt-url mqtts://HOST:{} [--telemetry mqtt]", listen.port()));
    }
    Ok(())
}

/// The ACL: `%u` is the client's certificate subject.
const ACL: &str = "\
# Written by `tern broker mosquitto-config`.
# The coordinator's client takes every device's telemetry and acknowledges it.
user client.coordinator.tern
topic readwrite tern/v1/#

# Each device under its own id only (its certificate's subject).
pattern readwrite tern/v1/%u/#
";

fn config(listen: SocketAddr, ca: &Path, cert: &Path, key: &Path, acl: &Path) -> String {
    format!(
        "\
# Written by `tern broker mosquitto-config` for the fleet's devices.
per_listener_settings false
allow_anonymous false
persistence false
max_packet_size 135168
acl_file {acl}
log_dest stderr

listener {port} {host}
tls_version tlsv1.3
cafile {ca}
certfile {cert}
keyfile {key}
require_certificate true
use_identity_as_username true
use_username_as_clientid true
",
        acl = acl.display(),
        port = listen.port(),
        host = listen.ip(),
        ca = ca.display(),
        cert = cert.display(),
        key = key.display(),
    )
}
