//! Downloading dataset files over HTTP with MD5 verification.
//!
//! Decisions:
//! - Blocking HTTP through `ureq` (no async runtime in the core crate). The agent takes proxy
//!   settings from the environment, gives up connecting after 30 s and a stalled read after 60 s.
//! - A file already present with the right MD5 is not downloaded again. A present file with the
//!   wrong MD5 is replaced (and a warning logged).
//! - Each file is streamed into `NAME.part` in the target folder while being hashed; only when the
//!   MD5 matches is it renamed to `NAME` (atomic within one folder), so an interrupted or corrupt
//!   download never leaves a file that looks complete. On any failure the `.part` file is removed.
//! - Errors: an HTTP status, a connection failure or a broken body stream is
//!   [`DataError::Download`] naming the URL; a wrong checksum is [`DataError::Checksum`] naming
//!   the target path; local file-system failures are [`DataError::Io`].
//! - Fashion-MNIST's MD5s are those published by the dataset's authors (and used by
//!   torchvision); they identify the original `.gz` files byte for byte, so a re-compressed copy
//!   of the same images does not match them.

use std::borrow::Cow;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use md5::{Digest, Md5};

use super::DataError;

/// The canonical source of Fashion-MNIST, as used by its authors and by torchvision.
pub const FASHION_MNIST_BASE_URL: &str =
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";

/// The four Fashion-MNIST files with their published MD5 checksums.
pub const FASHION_MNIST_FILES: [RemoteFile; 4] = [
    RemoteFile::fixed(
        "train-images-idx3-ubyte.gz",
        "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ),
    RemoteFile::fixed(
        "train-labels-idx1-ubyte.gz",
        "25c81989df183df01b3e8a0aad5dffbe",
    ),
    RemoteFile::fixed(
        "t10k-images-idx3-ubyte.gz",
        "bef4ecab320f06d8554ea6380940ec79",
    ),
    RemoteFile::fixed(
        "t10k-labels-idx1-ubyte.gz",
        "bb300cfdad3c16e7a12a480ee83cd310",
    ),
];

/// A file to fetch: its name (appended to the base URL, and the local file name) and its MD5.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// File name, relative to the base URL and to the target folder.
    pub name: Cow<'static, str>,
    /// Expected MD5 of the file, as hex (either case).
    pub md5: Cow<'static, str>,
}

impl RemoteFile {
    /// A remote file from any strings.
    pub fn new(name: impl Into<Cow<'static, str>>, md5: impl Into<Cow<'static, str>>) -> Self {
        RemoteFile {
            name: name.into(),
            md5: md5.into(),
        }
    }

    /// A remote file from static strings (usable in constants).
    pub const fn fixed(name: &'static str, md5: &'static str) -> Self {
        RemoteFile {
            name: Cow::Borrowed(name),
            md5: Cow::Borrowed(md5),
        }
    }
}

/// Downloads `files` from `base_url` into `dir` (created if needed) and returns their local
/// paths, in order. `progress(name, bytes_so_far, total)` is called as bytes arrive (`total` is
/// the `Content-Length`, when the server sends one) and once for each file already present.
pub fn download(
    base_url: &str,
    files: &[RemoteFile],
    dir: &Path,
    progress: &mut dyn FnMut(&str, u64, Option<u64>),
) -> Result<Vec<PathBuf>, DataError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_per_read(Some(Duration::from_secs(60)))
        .build()
        .into();
    download_with(&agent, base_url, files, dir, progress)
}

/// [`download`] of [`FASHION_MNIST_FILES`] from [`FASHION_MNIST_BASE_URL`].
pub fn download_fashion_mnist(
    dir: &Path,
    progress: &mut dyn FnMut(&str, u64, Option<u64>),
) -> Result<Vec<PathBuf>, DataError> {
    download(FASHION_MNIST_BASE_URL, &FASHION_MNIST_FILES, dir, progress)
}

/// The MD5 of a file's content, as lower-case hex.
pub fn file_md5(path: &Path) -> Result<String, DataError> {
    let io = |e| DataError::io(path, e);
    let mut file = File::open(path).map_err(io)?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn download_with(
    agent: &ureq::Agent,
    base_url: &str,
    files: &[RemoteFile],
    dir: &Path,
    progress: &mut dyn FnMut(&str, u64, Option<u64>),
) -> Result<Vec<PathBuf>, DataError> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut paths = Vec::with_capacity(files.len());
    for file in files {
        let name = file.name.as_ref();
        if name.is_empty() || name.contains(['/', '\\']) || name == "." || name == ".." {
            return Err(DataError::InvalidArgument(format!(
                "remote file name `{name}` must be a plain file name"
            )));
        }
        let path = dir.join(name);
        let expected = file.md5.to_ascii_lowercase();
        if path.is_file() {
            let actual = file_md5(&path)?;
            if actual == expected {
                let len = std::fs::metadata(&path)
                    .map_err(|e| DataError::io(&path, e))?
                    .len();
                tracing::info!(path = %path.display(), "already present with the right checksum");
                progress(name, len, Some(len));
                paths.push(path);
                continue;
            }
            tracing::warn!(
                path = %path.display(),
                expected = %expected,
                actual = %actual,
                "present with a wrong checksum; downloading it again"
            );
        }
        let url = format!("{}/{name}", base_url.trim_end_matches('/'));
        fetch(agent, &url, name, &path, &expected, progress)?;
        paths.push(path);
    }
    Ok(paths)
}

/// Removes the partial file when dropped, unless disarmed.
struct PartGuard<'a> {
    path: &'a Path,
    armed: bool,
}

impl Drop for PartGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

fn fetch(
    agent: &ureq::Agent,
    url: &str,
    name: &str,
    path: &Path,
    expected: &str,
    progress: &mut dyn FnMut(&str, u64, Option<u64>),
) -> Result<(), DataError> {
    let failed = |message: String| DataError::Download {
        url: url.to_string(),
        message,
    };
    tracing::info!(url, path = %path.display(), "downloading");
    let response = agent.get(url).call().map_err(|e| {
        failed(match e {
            ureq::Error::StatusCode(code) => format!("HTTP status {code}"),
            other => other.to_string(),
        })
    })?;
    let body = response.into_body();
    let total = body.content_length();
    let mut reader = body.into_reader();

    let part = path.with_file_name(format!("{name}.part"));
    let mut guard = PartGuard {
        path: &part,
        armed: true,
    };
    let io = |e| DataError::io(&part, e);
    let mut out = File::create(&part).map_err(io)?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    progress(name, 0, total);
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed(format!("reading the body after {done} bytes: {e}"))),
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(io)?;
        done += n as u64;
        progress(name, done, total);
    }
    out.sync_all().map_err(io)?;
    drop(out);
    let actual = hex(&hasher.finalize());
    if actual != expected {
        return Err(DataError::Checksum {
            path: path.to_path_buf(),
            expected: expected.to_string(),
            actual,
        });
    }
    std::fs::rename(&part, path).map_err(|e| DataError::io(path, e))?;
    guard.armed = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::thread::JoinHandle;
    use std::time::Instant;

    /// A tiny HTTP/1.1 server on 127.0.0.1 serving fixed files. It answers at most 16 requests
    /// and stops by itself after 20 s, or when told to; `stop` returns the paths requested.
    struct Server {
        base: String,
        stop: Arc<AtomicBool>,
        thread: JoinHandle<Vec<String>>,
    }

    impl Server {
        fn start(files: Vec<(&'static str, Vec<u8>)>) -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}/files/", listener.local_addr().unwrap());
            listener.set_nonblocking(true).unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let flag = Arc::clone(&stop);
            let thread = std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                let mut seen = Vec::new();
                while seen.len() < 16 && Instant::now() < deadline && !flag.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            if let Some(p) = answer(stream, &files) {
                                seen.push(p);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                seen
            });
            Server { base, stop, thread }
        }

        fn stop(self) -> Vec<String> {
            self.stop.store(true, Ordering::SeqCst);
            self.thread.join().unwrap()
        }
    }

    fn answer(stream: TcpStream, files: &[(&str, Vec<u8>)]) -> Option<String> {
        stream.set_nonblocking(false).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let mut reader = std::io::BufReader::new(stream.try_clone().ok()?);
        let mut request = String::new();
        reader.read_line(&mut request).ok()?;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).ok()? == 0 || line == "\r\n" {
                break;
            }
        }
        let path = request.split_whitespace().nth(1)?.to_string();
        let found = files
            .iter()
            .find(|(name, _)| path == format!("/files/{name}"));
        let mut stream = stream;
        let (status, body): (&str, &[u8]) = match found {
            Some((_, body)) => ("200 OK", body),
            None => ("404 Not Found", b"not here"),
        };
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\
             Connection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).ok()?;
        stream.write_all(body).ok()?;
        stream.flush().ok()?;
        Some(path)
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .proxy(None)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into()
    }

    fn md5_of(bytes: &[u8]) -> String {
        hex(&Md5::digest(bytes))
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn md5_hex_is_the_known_value() {
        assert_eq!(md5_of(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_of(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    }

    #[test]
    fn downloads_verifies_and_skips_present_files() {
        let a = (0..200_000u32)
            .map(|i| (i * 13 % 256) as u8)
            .collect::<Vec<_>>();
        let b = b"second file".to_vec();
        let server = Server::start(vec![("a.gz", a.clone()), ("b.gz", b.clone())]);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("new-folder");
        let files = [
            RemoteFile::new("a.gz", md5_of(&a)),
            RemoteFile::new("b.gz", md5_of(&b).to_uppercase()),
        ];
        let mut calls = Vec::new();
        let paths = download_with(
            &agent(),
            &server.base,
            &files,
            &dir,
            &mut |n, done, total| {
                calls.push((n.to_string(), done, total));
            },
        )
        .unwrap();
        assert_eq!(paths, vec![dir.join("a.gz"), dir.join("b.gz")]);
        assert_eq!(std::fs::read(&paths[0]).unwrap(), a);
        assert_eq!(std::fs::read(&paths[1]).unwrap(), b);
        assert_eq!(listing(&dir), vec!["a.gz", "b.gz"]);
        assert!(calls.contains(&("a.gz".into(), a.len() as u64, Some(a.len() as u64))));

        // Second run: nothing is fetched; a corrupted file is fetched again.
        std::fs::write(&paths[1], b"tampered").unwrap();
        let paths2 =
            download_with(&agent(), &server.base, &files, &dir, &mut |_, _, _| {}).unwrap();
        assert_eq!(paths2, paths);
        assert_eq!(std::fs::read(&paths[1]).unwrap(), b);
        assert_eq!(
            server.stop(),
            vec!["/files/a.gz", "/files/b.gz", "/files/b.gz"]
        );
    }

    #[test]
    fn checksum_mismatch_leaves_nothing_behind() {
        let server = Server::start(vec![("x.bin", b"actual bytes".to_vec())]);
        let tmp = tempfile::tempdir().unwrap();
        let files = [RemoteFile::new("x.bin", md5_of(b"other bytes"))];
        let err = download_with(
            &agent(),
            &server.base,
            &files,
            tmp.path(),
            &mut |_, _, _| {},
        )
        .unwrap_err();
        let path = tmp.path().join("x.bin");
        match &err {
            DataError::Checksum {
                path: p,
                expected,
                actual,
            } => {
                assert_eq!(p, &path);
                assert_eq!(expected, &md5_of(b"other bytes"));
                assert_eq!(actual, &md5_of(b"actual bytes"));
            }
            other => panic!("expected a checksum error, got {other:?}"),
        }
        assert!(err.to_string().contains(&path.display().to_string()));
        assert!(listing(tmp.path()).is_empty());
        server.stop();
    }

    #[test]
    fn http_404_is_a_download_error_naming_the_url() {
        let server = Server::start(vec![]);
        let tmp = tempfile::tempdir().unwrap();
        let files = [RemoteFile::new("missing.gz", md5_of(b""))];
        let err = download_with(
            &agent(),
            &server.base,
            &files,
            tmp.path(),
            &mut |_, _, _| {},
        )
        .unwrap_err();
        let url = format!("{}missing.gz", server.base);
        match &err {
            DataError::Download { url: u, message } => {
                assert_eq!(u, &url);
                assert!(message.contains("404"), "{message}");
            }
            other => panic!("expected a download error, got {other:?}"),
        }
        assert!(err.to_string().contains(&url));
        assert!(listing(tmp.path()).is_empty());
        server.stop();
    }

    #[test]
    fn connection_refused_is_a_download_error() {
        // Bind and drop to get a port nobody listens on.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let tmp = tempfile::tempdir().unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let files = [RemoteFile::new("f", md5_of(b""))];
        let err =
            download_with(&agent(), &base, &files, tmp.path(), &mut |_, _, _| {}).unwrap_err();
        assert!(matches!(err, DataError::Download { .. }), "{err:?}");
        assert!(err.to_string().contains(&format!("{base}/f")));
    }

    #[test]
    fn bad_names_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let files = [RemoteFile::new("../escape", "00")];
        let err = download_with(
            &agent(),
            "http://127.0.0.1:9",
            &files,
            tmp.path(),
            &mut |_, _, _| {},
        )
        .unwrap_err();
        assert!(matches!(err, DataError::InvalidArgument(_)));
    }

    #[test]
    fn fashion_mnist_table() {
        assert_eq!(FASHION_MNIST_FILES.len(), 4);
        for f in &FASHION_MNIST_FILES {
            assert_eq!(f.md5.len(), 32);
            assert!(f.name.ends_with("-ubyte.gz"));
        }
        assert!(FASHION_MNIST_BASE_URL.ends_with('/'));
    }
}
