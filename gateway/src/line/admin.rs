//! Registering line stations: a fresh P-256 key, a station certificate from
//! the issuing CA, and the registry rows (station, batches, certificate) in
//! one transaction. The key is generated here, on the machine that holds the
//! CA, and handed to the operator once in a 0600 file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use idgate_pki::ca::to_pem;
use idgate_pki::protocol::check_device_id;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PublicKeyData};

use crate::datadir::{DataDir, DataDirError};
use crate::registry::{NewStation, Registry, StationCertificate, StationError};

/// Why a station could not be added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AddStationError {
    /// The station id is not valid (same syntax as a device id).
    #[error("station id {0:?} {1}")]
    BadId(String, idgate_pki::protocol::IdError),
    /// A station must be allowed at least one batch.
    #[error("name at least one batch the station may enroll devices of (--batch)")]
    NoBatch,
    /// The CA could not be loaded.
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    /// Key generation or signing failed.
    #[error("issuing the station certificate: {0}")]
    Issue(String),
    /// The registry refused it.
    #[error(transparent)]
    Station(#[from] StationError),
}

/// A station's credentials, as issued: to be written to files once.
#[derive(Clone)]
pub struct StationCredentials {
    /// The station id.
    pub id: String,
    /// The station certificate then the issuing CA certificate (PEM).
    pub certificate_pem: String,
    /// The private key (PKCS#8 PEM).
    pub key_pem: String,
    /// The root CA certificate the station trusts for the broker (PEM).
    pub root_pem: String,
    /// Serial of the certificate.
    pub serial: String,
    /// Expiry, unix seconds.
    pub not_after: i64,
}

impl std::fmt::Debug for StationCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StationCredentials")
            .field("id", &self.id)
            .field("serial", &self.serial)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The files a station's credentials are written to in a directory.
#[derive(Clone, Debug)]
pub struct StationFiles {
    /// `station.pem`: certificate and issuing CA.
    pub certificate: PathBuf,
    /// `station.key` (0600).
    pub key: PathBuf,
    /// `root.pem`: the root CA to trust.
    pub root: PathBuf,
}

impl StationFiles {
    /// The file names inside `dir`.
    pub fn in_dir(dir: &Path) -> StationFiles {
        StationFiles {
            certificate: dir.join("station.pem"),
            key: dir.join("station.key"),
            root: dir.join("root.pem"),
        }
    }
}

impl StationCredentials {
    /// Writes the three files into `dir` (created if needed, 0700). Refuses
    /// to overwrite an existing key.
    pub fn write(&self, dir: &Path) -> std::io::Result<StationFiles> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
        let files = StationFiles::in_dir(dir);
        write_new(&files.key, self.key_pem.as_bytes(), 0o600)?;
        write_new(&files.certificate, self.certificate_pem.as_bytes(), 0o644)?;
        write_new(&files.root, self.root_pem.as_bytes(), 0o644)?;
        Ok(files)
    }
}

fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// A renewed station's new credentials and the certificates revoked with it.
#[derive(Clone, Debug)]
pub struct Renewed {
    /// The new key and certificate.
    pub credentials: StationCredentials,
    /// Serials of the station's earlier certificates revoked in the same
    /// transaction (empty unless asked for).
    pub revoked: Vec<String>,
}

/// Issues a new certificate and key for the registered, active station `id`.
/// Without `revoke_old` its earlier certificates stay valid until they expire
/// (a renewal ahead of expiry); with it (a CRL reason: `superseded`,
/// `keyCompromise`) they are revoked in the same transaction.
pub async fn renew_station(
    data: &DataDir,
    registry: &Registry,
    id: &str,
    lifetime: Duration,
    revoke_old: Option<&str>,
    actor: &str,
    now: i64,
) -> Result<Renewed, AddStationError> {
    check_device_id(id).map_err(|e| AddStationError::BadId(id.to_owned(), e))?;
    let (ca, chain) = data.load_issuing_ca()?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| AddStationError::Issue(e.to_string()))?;
    let issued = ca
        .issue_station(id, &key.subject_public_key_info(), lifetime, now)
        .map_err(|e| AddStationError::Issue(e.to_string()))?;
    let serial = issued.serial.to_string();
    let revoked = registry
        .renew_station_certificate(
            id,
            &StationCertificate {
                serial: serial.clone(),
                not_before: issued.not_before,
                not_after: issued.not_after,
                issued_at: now,
                der: issued.der.clone(),
                revoked_at: None,
            },
            revoke_old,
            actor,
            now,
        )
        .await?;
    Ok(Renewed {
        credentials: credentials(data, id, &issued, &chain, &key, serial)?,
        revoked,
    })
}

fn credentials(
    data: &DataDir,
    id: &str,
    issued: &idgate_pki::profile::DeviceCertificate,
    chain: &[Vec<u8>],
    key: &KeyPair,
    serial: String,
) -> Result<StationCredentials, AddStationError> {
    let mut pem_chain: Vec<&[u8]> = vec![&issued.der];
    pem_chain.extend(chain.iter().map(Vec::as_slice));
    let root_pem = crate::datadir::read_text(&data.root_certificate())?;
    Ok(StationCredentials {
        id: id.to_owned(),
        certificate_pem: to_pem(&pem_chain),
        key_pem: key.serialize_pem(),
        root_pem,
        serial,
        not_after: issued.not_after,
    })
}

/// Issues a certificate for station `id` and registers the station with the
/// batches it may enroll devices of.
pub async fn add_station(
    data: &DataDir,
    registry: &Registry,
    id: &str,
    batches: &[String],
    lifetime: Duration,
    actor: &str,
    now: i64,
) -> Result<StationCredentials, AddStationError> {
    check_device_id(id).map_err(|e| AddStationError::BadId(id.to_owned(), e))?;
    if batches.is_empty() {
        return Err(AddStationError::NoBatch);
    }
    let (ca, chain) = data.load_issuing_ca()?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| AddStationError::Issue(e.to_string()))?;
    let issued = ca
        .issue_station(id, &key.subject_public_key_info(), lifetime, now)
        .map_err(|e| AddStationError::Issue(e.to_string()))?;
    let mut batches = batches.to_vec();
    batches.sort();
    batches.dedup();
    let serial = issued.serial.to_string();
    registry
        .add_station(
            &NewStation {
                id: id.to_owned(),
                batches,
                created_by: actor.to_owned(),
                certificate: StationCertificate {
                    serial: serial.clone(),
                    not_before: issued.not_before,
                    not_after: issued.not_after,
                    issued_at: now,
                    der: issued.der.clone(),
                    revoked_at: None,
                },
            },
            now,
        )
        .await?;
    credentials(data, id, &issued, &chain, &key, serial)
}
