//! The data directory: where the CA, the token seal key, the broker's TLS
//! certificate and the SQLite registry live.
//!
//! ```text
//! DIR/ca/root.pem          root CA certificate (give this to devices)
//! DIR/ca/root.key          root CA key, 0600 — move it offline
//! DIR/ca/issuing.pem       issuing intermediate certificate
//! DIR/ca/issuing.key       issuing intermediate key, 0600
//! DIR/ca/credentials.key   seal key of the enrollment tokens, 0600
//! DIR/tls/server.pem       broker TLS certificate (signed by the root) + chain
//! DIR/tls/server.key       its key, 0600
//! DIR/registry.db          SQLite registry (unless --database says otherwise)
//! ```

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use idgate_pki::ca::{self, IssuingCa, NewCa};
use rand::RngCore;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

use crate::provisioner::token::{SEAL_KEY_LEN, Tokens};

/// Lifetime of the broker's TLS server certificate.
pub const SERVER_CERT_DAYS: i64 = 398;

/// A data directory problem: missing, unreadable or half-made files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataDirError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// `ca init` found a CA already there.
    #[error("a CA already exists in {0}; refusing to overwrite it")]
    CaExists(PathBuf),
    /// No CA yet.
    #[error("no CA in {0}: run `idgate ca init --data {1}` (or `idgate serve`, which creates one)")]
    NoCa(PathBuf, PathBuf),
    /// A CA file is invalid.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// rcgen failed making the TLS certificate.
    #[error("TLS certificate: {0}")]
    Tls(#[from] rcgen::Error),
    /// The seal key file has the wrong size.
    #[error("{0} must hold exactly {SEAL_KEY_LEN} bytes")]
    BadSealKey(PathBuf),
}

/// Paths inside a data directory.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io {
        path: path.to_owned(),
        source,
    }
}

impl DataDir {
    /// The data directory at `root` (not created until needed).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// The directory itself.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn ca_dir(&self) -> PathBuf {
        self.root.join("ca")
    }

    /// Root CA certificate.
    pub fn root_certificate(&self) -> PathBuf {
        self.ca_dir().join("root.pem")
    }

    /// Root CA key.
    pub fn root_key(&self) -> PathBuf {
        self.ca_dir().join("root.key")
    }

    /// Issuing CA certificate.
    pub fn issuing_certificate(&self) -> PathBuf {
        self.ca_dir().join("issuing.pem")
    }

    /// Issuing CA key.
    pub fn issuing_key(&self) -> PathBuf {
        self.ca_dir().join("issuing.key")
    }

    /// Token seal key.
    pub fn seal_key(&self) -> PathBuf {
        self.ca_dir().join("credentials.key")
    }

    /// Broker TLS certificate chain.
    pub fn tls_certificate(&self) -> PathBuf {
        self.root.join("tls").join("server.pem")
    }

    /// Broker TLS key.
    pub fn tls_key(&self) -> PathBuf {
        self.root.join("tls").join("server.key")
    }

    /// The default SQLite registry file.
    pub fn registry_file(&self) -> PathBuf {
        self.root.join("registry.db")
    }

    /// The default registry URL.
    pub fn default_database_url(&self) -> String {
        crate::registry::sqlite_url(&self.registry_file())
    }

    /// Whether a CA has been created here.
    pub fn has_ca(&self) -> bool {
        self.issuing_certificate().exists()
    }

    /// Creates the root and issuing CAs, the token seal key and the broker's
    /// TLS certificate. Refuses if any CA file exists. Keys are written 0600,
    /// and a file is never replaced.
    pub fn init_ca(&self) -> Result<(), DataDirError> {
        let ca_dir = self.ca_dir();
        for path in [
            self.root_certificate(),
            self.root_key(),
            self.issuing_certificate(),
            self.issuing_key(),
        ] {
            if path.exists() {
                return Err(DataDirError::CaExists(ca_dir));
            }
        }
        create_private_dir(&self.root)?;
        create_private_dir(&ca_dir)?;
        let mut label = [0u8; 4];
        rand::rngs::OsRng.fill_bytes(&mut label);
        let now = time::OffsetDateTime::now_utc();
        let new: NewCa = ca::create(&ca::hex(&label), now)?;
        write_new(&self.root_key(), new.root_key.as_bytes(), true)?;
        write_new(&self.issuing_key(), new.issuing_key.as_bytes(), true)?;
        let mut seal_key = [0u8; SEAL_KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut seal_key);
        write_new(&self.seal_key(), &seal_key, true)?;
        self.write_server_certificate(&new, now)?;
        // The certificates last: `has_ca` is true only once everything exists.
        write_new(
            &self.root_certificate(),
            new.root_certificate.as_bytes(),
            false,
        )?;
        write_new(
            &self.issuing_certificate(),
            new.issuing_certificate.as_bytes(),
            false,
        )?;
        Ok(())
    }

    /// The broker's TLS certificate is signed by the root (devices pin the
    /// root), for `localhost`, the loopback addresses and this host's name.
    fn write_server_certificate(
        &self,
        new: &NewCa,
        now: time::OffsetDateTime,
    ) -> Result<(), DataDirError> {
        let tls_dir = self.root.join("tls");
        create_private_dir(&tls_dir)?;
        let root_key = KeyPair::from_pem(&new.root_key)?;
        let root_issuer = Issuer::from_ca_cert_pem(&new.root_certificate, &root_key)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "idgate");
        dn.push(DnType::CommonName, "idgate broker");
        params.distinguished_name = dn;
        let mut names = vec![
            SanType::DnsName("localhost".try_into()?),
            SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
            SanType::IpAddress(std::net::Ipv6Addr::LOCALHOST.into()),
        ];
        if let Some(host) = hostname().filter(|h| h != "localhost")
            && let Ok(name) = host.try_into()
        {
            names.push(SanType::DnsName(name));
        }
        params.subject_alt_names = names;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(idgate_pki::profile::Serial::random().into());
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(SERVER_CERT_DAYS);
        let certificate = params.signed_by(&key, &root_issuer)?;
        write_new(&self.tls_key(), key.serialize_pem().as_bytes(), true)?;
        write_new(&self.tls_certificate(), certificate.pem().as_bytes(), false)?;
        Ok(())
    }

    /// Loads the issuing CA and the chain sent to devices (issuing CA first).
    pub fn load_issuing_ca(&self) -> Result<(IssuingCa, Vec<Vec<u8>>), DataDirError> {
        if !self.has_ca() {
            return Err(DataDirError::NoCa(self.ca_dir(), self.root.clone()));
        }
        let certificate = read_text(&self.issuing_certificate())?;
        let key = read_text(&self.issuing_key())?;
        let issuing = IssuingCa::from_pem(&certificate, &key)?;
        let chain = vec![issuing.certificate().to_vec()];
        Ok((issuing, chain))
    }

    /// Loads the token sealer.
    pub fn tokens(&self) -> Result<Tokens, DataDirError> {
        let path = self.seal_key();
        let bytes = fs::read(&path).map_err(io(&path))?;
        let key: [u8; SEAL_KEY_LEN] = bytes
            .try_into()
            .map_err(|_| DataDirError::BadSealKey(path.clone()))?;
        Ok(Tokens::new(&key))
    }
}

/// Reads a text file.
pub fn read_text(path: &Path) -> Result<String, DataDirError> {
    fs::read_to_string(path).map_err(io(path))
}

fn create_private_dir(path: &Path) -> Result<(), DataDirError> {
    fs::create_dir_all(path).map_err(io(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o700)).map_err(io(path))
}

/// Writes a new file (never replacing one), fsynced; secrets get mode 0600
/// from the moment they exist.
fn write_new(path: &Path, contents: &[u8], secret: bool) -> Result<(), DataDirError> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(io(path))?;
    file.write_all(contents).map_err(io(path))?;
    file.sync_all().map_err(io(path))
}

fn hostname() -> Option<String> {
    fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_private_keys_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let data = DataDir::new(dir.path().join("data"));
        assert!(!data.has_ca());
        assert!(matches!(
            data.load_issuing_ca(),
            Err(DataDirError::NoCa(..))
        ));
        data.init_ca().unwrap();
        assert!(data.has_ca());
        for key in [
            data.root_key(),
            data.issuing_key(),
            data.seal_key(),
            data.tls_key(),
        ] {
            let mode = fs::metadata(&key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let before = fs::read(data.issuing_key()).unwrap();
        assert!(matches!(data.init_ca(), Err(DataDirError::CaExists(_))));
        assert_eq!(fs::read(data.issuing_key()).unwrap(), before);

        let (issuing, chain) = data.load_issuing_ca().unwrap();
        assert_eq!(chain, vec![issuing.certificate().to_vec()]);
        data.tokens().unwrap();
    }
}
