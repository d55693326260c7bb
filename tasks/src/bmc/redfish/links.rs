//! Links, as pure functions: the base URL an OBM's `host` names, what its `systemId` may
//! be, the `@odata.id`s and action targets a BMC's JSON holds, and how a link resolves
//! against the base URL without leaving the BMC's origin.
//!
//! Nothing here does I/O; the send path (`client.rs`) calls [`resolve`] on every request.

use reqwest::Url;
use serde_json::Value;

/// `scheme://host:port/` from an OBM's `host` (a bare host, `host:port` or a URL) and
/// `port`; a bare host means HTTPS.
pub(super) fn base_url(host: &str, port: Option<u16>) -> Result<Url, String> {
    let host = host.trim();
    if host.is_empty() {
        return Err("'host' is empty; give the BMC's address or base URL".to_owned());
    }
    let with_scheme = if host.contains("://") {
        host.to_owned()
    } else if host.matches(':').count() > 1 && !host.starts_with('[') {
        // A bare IPv6 address.
        format!("https://[{host}]")
    } else {
        format!("https://{host}")
    };
    let mut url =
        Url::parse(&with_scheme).map_err(|e| format!("'host' is not a usable address: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "'host' must be http:// or https://, got {}://",
            url.scheme()
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err("'host' has no host name".to_owned());
    }
    // Credentials belong in `user` and `password`, never in the URL we show in messages.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    if let Some(port) = port {
        let _ = url.set_port(Some(port));
    }
    url.set_path("/");
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

/// Which ComputerSystem a driver talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum SystemRef {
    /// None named: the service's only ComputerSystem.
    Only,
    /// An id, name or UUID, looked up in the service's Systems collection.
    Id(String),
    /// A link to the ComputerSystem: a path given as the OBM's `systemId`, or a link the
    /// BMC itself listed (discovery). The send path resolves and checks it like any other.
    Link(String),
}

/// What an OBM's `systemId` names. It picks a ComputerSystem on the BMC that `host`
/// names, so it is never a URL: one (`http://...`, or scheme-relative `//host/...`) could
/// send the node's credentials to another server, and is refused.
pub(super) fn system_ref(system_id: Option<&str>) -> Result<SystemRef, String> {
    let Some(id) = system_id.filter(|s| !s.is_empty()) else {
        return Ok(SystemRef::Only);
    };
    let trimmed = id.trim_start();
    if id.contains("://") || trimmed.starts_with("//") || trimmed.starts_with("\\\\") {
        return Err(format!(
            "systemId '{id}' is refused: it names a ComputerSystem on the BMC given by \
             'host' (an id, name, UUID or a path such as /redfish/v1/Systems/1), not a URL"
        ));
    }
    Ok(if id.starts_with('/') {
        SystemRef::Link(id.to_owned())
    } else {
        SystemRef::Id(id.to_owned())
    })
}

/// Why a link cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum LinkError {
    /// It is not a URL or path at all; the parser's words.
    Unusable(String),
    /// It resolves to another origin (scheme, host or port) than the BMC's.
    CrossOrigin,
}

/// `link` (a path, or an absolute or scheme-relative URL) resolved against `base`,
/// provided it stays on `base`'s origin. User information in the link is dropped: the
/// driver's credentials come from the OBM, never from the BMC's JSON.
pub(super) fn resolve(base: &Url, link: &str) -> Result<Url, LinkError> {
    let mut url = base
        .join(link)
        .map_err(|e| LinkError::Unusable(e.to_string()))?;
    if !same_origin(base, &url) {
        return Err(LinkError::CrossOrigin);
    }
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Ok(url)
}

/// Whether two URLs share scheme, host and port (the default port counting as given).
pub(super) fn same_origin(a: &Url, b: &Url) -> bool {
    a.origin() == b.origin()
}

/// `@odata.id` of a link object.
pub(super) fn odata_id(link: Option<&Value>) -> Option<String> {
    link?
        .get("@odata.id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The `@odata.id`s of an array of links.
pub(super) fn links(array: Option<&Value>) -> Vec<String> {
    array
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(|l| odata_id(Some(l))).collect())
        .unwrap_or_default()
}

/// The member paths of a collection.
pub(super) fn members(collection: &Value) -> Vec<String> {
    links(collection.get("Members"))
}

/// The `target` of an action (`#VirtualMedia.InsertMedia`) in a resource.
pub(super) fn action_target(doc: &Value, action: &str) -> Option<String> {
    doc.get("Actions")?
        .get(action)?
        .get("target")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn base_urls() {
        let cases = [
            ("10.0.0.5", None, "https://10.0.0.5/"),
            ("10.0.0.5", Some(8443), "https://10.0.0.5:8443/"),
            ("http://127.0.0.1:8000", None, "http://127.0.0.1:8000/"),
            (
                "https://admin:pw@bmc.example:8443/redfish/v1",
                None,
                "https://bmc.example:8443/",
            ),
            ("fe80::1", None, "https://[fe80::1]/"),
        ];
        for (host, port, want) in cases {
            assert_eq!(base_url(host, port).unwrap().as_str(), want, "{host}");
        }
        assert!(base_url("", None).is_err());
        assert!(base_url("ftp://x", None).is_err());
    }

    /// `(base, link, the URL it resolves to or None when it leaves the origin)`.
    #[test]
    fn links_resolve_only_within_the_origin() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "https://bmc:8443/",
                "/redfish/v1/Systems/1",
                Some("https://bmc:8443/redfish/v1/Systems/1"),
            ),
            (
                "https://bmc:8443/",
                "https://bmc:8443/redfish/v1/",
                Some("https://bmc:8443/redfish/v1/"),
            ),
            // The default port is the same origin, spelled or not.
            ("https://bmc/", "https://bmc:443/x", Some("https://bmc/x")),
            (
                "http://10.0.0.5/",
                "//10.0.0.5/redfish/v1",
                Some("http://10.0.0.5/redfish/v1"),
            ),
            // Credentials in a link are dropped.
            (
                "http://bmc/",
                "http://u:p@bmc/redfish/v1",
                Some("http://bmc/redfish/v1"),
            ),
            ("http://bmc/", "http://evil:9999/redfish/v1", None),
            ("http://bmc/", "//evil/redfish/v1", None),
            ("http://bmc/", "\\\\evil\\redfish", None),
            ("http://bmc/", "/\\evil/redfish", None),
            // Another port, another scheme: another origin.
            ("http://bmc/", "http://bmc:8080/redfish/v1", None),
            ("https://bmc/", "http://bmc/redfish/v1", None),
            ("http://bmc/", "file:///etc/passwd", None),
        ];
        for &(base, link, want) in cases {
            let base = Url::parse(base).unwrap();
            let got = resolve(&base, link);
            match want {
                Some(want) => assert_eq!(got.map(String::from), Ok(want.to_owned()), "{link}"),
                None => assert_eq!(got, Err(LinkError::CrossOrigin), "{link}"),
            }
        }
        let base = Url::parse("http://bmc/").unwrap();
        assert!(matches!(
            resolve(&base, "http://[::1"),
            Err(LinkError::Unusable(_))
        ));
    }

    #[test]
    fn system_ids() {
        let ok: &[(Option<&str>, SystemRef)] = &[
            (None, SystemRef::Only),
            (Some(""), SystemRef::Only),
            (Some("1"), SystemRef::Id("1".into())),
            (Some("node-1"), SystemRef::Id("node-1".into())),
            (
                Some("/redfish/v1/Systems/1"),
                SystemRef::Link("/redfish/v1/Systems/1".into()),
            ),
        ];
        for (id, want) in ok {
            assert_eq!(system_ref(*id).as_ref(), Ok(want), "{id:?}");
        }
        for id in [
            "http://127.0.0.1:9999/x",
            "https://bmc/redfish/v1/Systems/1",
            "//evil/redfish/v1/Systems/1",
            " //evil/x",
            "\\\\evil\\x",
        ] {
            let err = system_ref(Some(id)).unwrap_err();
            assert!(err.contains(id) && err.contains("not a URL"), "{err}");
        }
    }

    #[test]
    fn odata_links() {
        let doc = json!({
            "Members": [{ "@odata.id": "/a" }, { "@odata.id": "" }, {}, { "@odata.id": "/b" }],
            "Actions": { "#X.Y": { "target": "/a/Actions/X.Y" } },
        });
        assert_eq!(members(&doc), ["/a", "/b"]);
        assert_eq!(
            action_target(&doc, "#X.Y").as_deref(),
            Some("/a/Actions/X.Y")
        );
        assert_eq!(action_target(&doc, "#X.Z"), None);
        assert_eq!(odata_id(doc.get("Nothing")), None);
    }
}
