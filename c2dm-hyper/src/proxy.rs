//! HTTP proxies: every request to a proxied host goes through a `CONNECT` tunnel, so TLS runs
//! end to end and the proxy sees only the host and port.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderValue, Uri};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tower_service::Service;

type BoxError = Box<dyn StdError + Send + Sync>;

/// The longest answer head a proxy may give to a `CONNECT`.
const MAX_CONNECT_ANSWER: usize = 16 * 1024;

/// An HTTP proxy that [`HyperTransport`](crate::HyperTransport) reaches hosts through, by
/// `CONNECT` tunnels; see [`HyperTransportBuilder::proxy`](crate::HyperTransportBuilder::proxy).
/// Its credentials never show in `Debug`.
///
/// ```
/// use c2dm_hyper::Proxy;
/// let proxy = Proxy::new("http://alice:s3cret@proxy.internal:3128")?;
/// assert_eq!(format!("{proxy:?}"), "Proxy(http://<credentials>@proxy.internal:3128)");
/// # Ok::<(), c2dm_hyper::ProxyError>(())
/// ```
#[derive(Clone)]
pub struct Proxy {
    /// `http://host:port`, what the TCP connection goes to.
    address: Uri,
    /// `Basic …`, marked sensitive.
    authorization: Option<HeaderValue>,
}

impl fmt::Debug for Proxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let authority = self.address.authority().map_or("", |a| a.as_str());
        match self.authorization {
            Some(_) => write!(f, "Proxy(http://<credentials>@{authority})"),
            None => write!(f, "Proxy(http://{authority})"),
        }
    }
}

/// A proxy URL that cannot be used. It never repeats the URL's credentials.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// Not a URL of the form `http://[user:password@]host[:port]`.
    #[error("a proxy is http://[user:password@]host[:port]: {0}")]
    Invalid(String),
}

impl Proxy {
    /// A proxy at `url`: `http://host:port` (port 80 if left out), with optional credentials
    /// (`http://user:password@host:port`, percent-encoded where needed) sent as Basic
    /// `Proxy-Authorization`. `https://` proxies (TLS to the proxy itself) are not supported.
    pub fn new(url: &str) -> Result<Self, ProxyError> {
        let url = url.trim();
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            ProxyError::Invalid(if url.contains("://") {
                "only http:// proxies are supported".to_owned()
            } else {
                "no http:// scheme".to_owned()
            })
        })?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('/') || rest.contains('?') || rest.contains('#') {
            return Err(ProxyError::Invalid("a proxy URL has no path".to_owned()));
        }
        let (credentials, host) = match rest.rsplit_once('@') {
            Some((credentials, host)) => (Some(credentials), host),
            None => (None, rest),
        };
        let host = if host.is_empty() {
            return Err(ProxyError::Invalid("no host".to_owned()));
        } else if host
            .rsplit_once(':')
            .is_some_and(|(_, port)| !port.contains(']'))
        {
            host.to_owned()
        } else {
            format!("{host}:80")
        };
        let address: Uri = format!("http://{host}")
            .parse()
            .map_err(|_| ProxyError::Invalid(format!("{host} is not a host and port")))?;
        if address.port_u16().is_none() {
            return Err(ProxyError::Invalid(format!("{host} has no usable port")));
        }
        let authorization = match credentials {
            None => None,
            Some(credentials) => {
                let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
                let pair = format!("{}:{}", percent_decode(user)?, percent_decode(password)?);
                let mut value = HeaderValue::try_from(format!("Basic {}", base64(pair.as_bytes())))
                    .map_err(|_| ProxyError::Invalid("unusable credentials".to_owned()))?;
                value.set_sensitive(true);
                Some(value)
            }
        };
        Ok(Self {
            address,
            authorization,
        })
    }
}

/// Hosts reached without the proxy, as `NO_PROXY` lists them: `*` (every host), a host name
/// (which also covers its subdomains; a leading `.` is the same), or an IP address; an entry
/// may end in `:port` to cover that port only. Names are compared without case.
#[derive(Clone, Debug, Default)]
pub(crate) struct NoProxy {
    all: bool,
    entries: Vec<(String, Option<u16>)>,
}

impl NoProxy {
    pub(crate) fn parse(list: &str) -> Self {
        let mut no = Self::default();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                no.all = true;
                continue;
            }
            let (host, port) = match entry.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                    (host, port.parse().ok())
                }
                _ => (entry, None),
            };
            let host = host
                .trim_start_matches("*.")
                .trim_start_matches('.')
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_ascii_lowercase();
            no.entries.push((host, port));
        }
        no
    }

    /// Whether `uri`'s host is to be reached directly.
    pub(crate) fn covers(&self, uri: &Uri) -> bool {
        if self.all {
            return true;
        }
        let Some(host) = uri.host() else {
            return false;
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        let port = uri.port_u16().or(match uri.scheme_str() {
            Some("https") => Some(443),
            _ => Some(80),
        });
        self.entries.iter().any(|(entry, entry_port)| {
            let name = host == *entry
                || host
                    .strip_suffix(entry.as_str())
                    .is_some_and(|prefix| prefix.ends_with('.'));
            name && entry_port.is_none_or(|p| Some(p) == port)
        })
    }
}

/// Which proxy each request takes.
#[derive(Clone, Debug, Default)]
pub(crate) struct Proxies {
    /// For `https://` hosts.
    pub(crate) https: Option<Proxy>,
    /// For `http://` hosts.
    pub(crate) http: Option<Proxy>,
    pub(crate) no_proxy: NoProxy,
}

impl Proxies {
    /// Every host through `proxy`.
    pub(crate) fn all(proxy: Proxy) -> Self {
        Self {
            https: Some(proxy.clone()),
            http: Some(proxy),
            no_proxy: NoProxy::default(),
        }
    }

    /// As the environment says, `var` looking a variable up: `HTTPS_PROXY` for `https://`
    /// hosts, `HTTP_PROXY` for `http://` ones, `NO_PROXY` for those reached directly (the
    /// lower-case names too; the upper-case ones win). An empty variable is no proxy.
    pub(crate) fn from_env(var: impl Fn(&str) -> Option<String>) -> Result<Self, ProxyError> {
        let get = |name: &str| {
            var(name)
                .or_else(|| var(&name.to_ascii_lowercase()))
                .filter(|v| !v.trim().is_empty())
        };
        let proxy = |name: &str| {
            get(name)
                .map(|url| {
                    Proxy::new(&url).map_err(|ProxyError::Invalid(why)| {
                        ProxyError::Invalid(format!("{name}: {why}"))
                    })
                })
                .transpose()
        };
        Ok(Self {
            https: proxy("HTTPS_PROXY")?,
            http: proxy("HTTP_PROXY")?,
            no_proxy: NoProxy::parse(&get("NO_PROXY").unwrap_or_default()),
        })
    }

    fn for_uri(&self, uri: &Uri) -> Option<&Proxy> {
        let proxy = match uri.scheme_str() {
            Some("https") => self.https.as_ref(),
            _ => self.http.as_ref(),
        }?;
        (!self.no_proxy.covers(uri)).then_some(proxy)
    }
}

/// Opens TCP connections: straight to the host, or to the proxy and through a `CONNECT`
/// tunnel to the host. hyper-rustls' TLS then runs over either.
#[derive(Clone)]
pub(crate) struct ProxyConnector {
    pub(crate) http: HttpConnector,
    pub(crate) proxies: Proxies,
}

/// A proxy did not open the tunnel; nothing was sent to the host.
#[derive(Debug, thiserror::Error)]
#[error("the proxy at {proxy} {why}")]
pub(crate) struct TunnelError {
    proxy: String,
    why: String,
}

impl Service<Uri> for ProxyConnector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.http.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let Some(proxy) = self.proxies.for_uri(&dst).cloned() else {
            let connecting = self.http.call(dst);
            return Box::pin(async move { connecting.await.map_err(Into::into) });
        };
        let connecting = self.http.call(proxy.address.clone());
        Box::pin(async move {
            let stream = connecting.await?.into_inner();
            tunnel(stream, &proxy, &dst).await.map(TokioIo::new)
        })
    }
}

/// Asks the proxy on `stream` for a tunnel to `dst`'s host and port.
async fn tunnel(mut stream: TcpStream, proxy: &Proxy, dst: &Uri) -> Result<TcpStream, BoxError> {
    let proxy_name = proxy
        .address
        .authority()
        .map_or("", |a| a.as_str())
        .to_owned();
    let fail = |why: String| TunnelError {
        proxy: proxy_name.clone(),
        why,
    };
    let host = dst
        .host()
        .ok_or_else(|| fail(format!("cannot tunnel to {dst}: no host")))?;
    let port = dst.port_u16().unwrap_or(match dst.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    let target = format!("{host}:{port}");
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n").into_bytes();
    if let Some(authorization) = &proxy.authorization {
        head.extend_from_slice(b"Proxy-Authorization: ");
        head.extend_from_slice(authorization.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
    stream.write_all(&head).await?;
    // The answer's head, byte by byte: what follows it belongs to the tunnel.
    let mut answer = Vec::with_capacity(256);
    while !answer.ends_with(b"\r\n\r\n") {
        if answer.len() >= MAX_CONNECT_ANSWER {
            return Err(fail("gave an answer too long to be one".to_owned()).into());
        }
        let byte = stream.read_u8().await.map_err(|e| {
            fail(format!(
                "closed the connection before opening a tunnel to {target}: {e}"
            ))
        })?;
        answer.push(byte);
    }
    let status_line = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok());
    match status {
        Some(200..=299) => Ok(stream),
        // 407 is the standard answer; some proxies (tinyproxy) answer a CONNECT with 401.
        Some(401 | 407) if proxy.authorization.is_none() => Err(fail(format!(
            "asks for credentials ({status_line}): give them in the proxy URL, http://user:password@host:port"
        ))
        .into()),
        Some(401 | 407) => Err(fail(format!("refused the credentials ({status_line})")).into()),
        _ => Err(fail(format!("refused a tunnel to {target}: {status_line}")).into()),
    }
}

fn percent_decode(text: &str) -> Result<String, ProxyError> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| {
                    ProxyError::Invalid("bad percent-encoding in the credentials".to_owned())
                })?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ProxyError::Invalid("credentials that are not UTF-8".to_owned()))
}

fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), output);
        }
    }

    #[test]
    fn proxy_urls() {
        let proxy = Proxy::new("http://al%40ice:p%3Ass@proxy:3128").unwrap();
        assert_eq!(proxy.address, "http://proxy:3128/");
        // base64("al@ice:p:ss")
        assert_eq!(
            proxy.authorization.as_ref().unwrap(),
            "Basic YWxAaWNlOnA6c3M="
        );
        assert!(proxy.authorization.as_ref().unwrap().is_sensitive());
        assert!(!format!("{proxy:?}").contains("p%3Ass"));
        assert_eq!(
            Proxy::new("http://proxy").unwrap().address,
            "http://proxy:80/"
        );
        assert_eq!(
            Proxy::new("http://10.0.0.1:8080/").unwrap().address,
            "http://10.0.0.1:8080/"
        );
        for bad in [
            "proxy:3128",
            "https://proxy:3128",
            "http://",
            "http://proxy:3128/path",
            "http://a:b@proxy:x",
        ] {
            assert!(Proxy::new(bad).is_err(), "{bad}");
        }
        let err = Proxy::new("socks5://user:hunter2@proxy:1080").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn no_proxy_entries() {
        let no = NoProxy::parse(" localhost, .internal.example, 10.1.2.3 ,emulator:8443,[::1]");
        let covers = |url: &str| no.covers(&url.parse().unwrap());
        assert!(covers("https://localhost/c2dm/send"));
        assert!(covers("https://LOCALHOST:8443/"));
        assert!(covers("https://a.internal.example/"));
        assert!(covers("https://internal.example/"));
        assert!(!covers("https://notinternal.example/"));
        assert!(covers("http://10.1.2.3:9000/"));
        assert!(covers("https://emulator:8443/"));
        assert!(!covers("https://emulator/"));
        assert!(covers("https://[::1]:8443/"));
        assert!(!covers("https://android.apis.google.com/c2dm/send"));
        assert!(NoProxy::parse("*").covers(&"https://anything/".parse().unwrap()));
        assert!(!NoProxy::parse("").covers(&"https://anything/".parse().unwrap()));
    }

    #[test]
    fn proxies_from_the_environment() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let proxies = Proxies::from_env(env(&[
            ("https_proxy", "http://lower:1"),
            ("HTTPS_PROXY", "http://upper:2"),
            ("http_proxy", "http://plain:3"),
            ("NO_PROXY", "localhost"),
        ]))
        .unwrap();
        let via = |url: &str| {
            proxies
                .for_uri(&url.parse().unwrap())
                .map(|p| p.address.to_string())
        };
        assert_eq!(
            via("https://android.apis.google.com/").as_deref(),
            Some("http://upper:2/")
        );
        assert_eq!(via("http://emulator/").as_deref(), Some("http://plain:3/"));
        assert_eq!(via("https://localhost:8443/"), None);
        assert!(
            Proxies::from_env(env(&[("HTTPS_PROXY", "")]))
                .unwrap()
                .https
                .is_none()
        );
        let err = Proxies::from_env(env(&[("HTTPS_PROXY", "ftp://x:y@proxy")])).unwrap_err();
        assert!(
            err.to_string().starts_with("a proxy is") && err.to_string().contains("HTTPS_PROXY"),
            "{err}"
        );
    }
}
