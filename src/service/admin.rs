//! `tollgate.v1.Admin`: support tools to look at a counter and reset it.
//!
//! Served only on `server.admin_listen` (see [`crate::server::run_admin`]).
//! Every call is logged at info, with who made it (the peer's address, and
//! the client certificate's subject under mutual TLS), the call, its
//! arguments and its outcome: an audit trail of who unlocked whom.

use std::{net::SocketAddr, sync::Arc};

use tonic::{Request, Response, Status};

use super::wire_duration;
use crate::{
    limiter::{self, Limiter},
    proto::{
        InspectLimitRequest, InspectLimitResponse, ResetLimitRequest, ResetLimitResponse,
        ResetUsageRequest, ResetUsageResponse, admin_server::Admin,
    },
    store::Store,
};

/// Serves InspectLimit, ResetLimit and ResetUsage from a shared limiter.
#[derive(Debug)]
pub struct AdminService<S> {
    limiter: Arc<Limiter<S>>,
}

impl<S> AdminService<S> {
    /// A service answering from `limiter`.
    pub fn new(limiter: Arc<Limiter<S>>) -> Self {
        Self { limiter }
    }
}

/// Who made a call, for the log.
struct Caller {
    peer: Option<SocketAddr>,
    /// The client certificate's subject, under mutual TLS.
    certificate: Option<String>,
}

impl Caller {
    fn of<T>(request: &Request<T>) -> Self {
        let certificate = request.peer_certs().and_then(|certs| {
            certs
                .first()
                .map(|leaf| certificate_subject(leaf).unwrap_or_else(|| "(unreadable)".to_owned()))
        });
        Self {
            peer: request.remote_addr(),
            certificate,
        }
    }

    fn peer(&self) -> String {
        self.peer
            .map_or_else(|| "unknown".to_owned(), |peer| peer.to_string())
    }
}

/// The outcome for the log: the answer's gist, or the error.
fn outcome<T>(result: &Result<T, limiter::Error>, gist: impl FnOnce(&T) -> String) -> String {
    match result {
        Ok(answer) => gist(answer),
        Err(err) => format!("error: {err}"),
    }
}

#[tonic::async_trait]
impl<S: Store> Admin for AdminService<S> {
    async fn inspect_limit(
        &self,
        request: Request<InspectLimitRequest>,
    ) -> Result<Response<InspectLimitResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.get_ref();
        let result = self
            .limiter
            .inspect_limit(&request.rule, &request.subject, &request.tier)
            .await;
        // Subjects are Debug-quoted: a crafted one cannot forge log lines.
        tracing::info!(
            peer = %caller.peer(),
            client_certificate = caller.certificate.as_deref(),
            call = "InspectLimit",
            rule = ?request.rule,
            subject = ?request.subject,
            tier = ?request.tier,
            outcome = %outcome(&result, |o| format!(
                "used {} of {}, blocked {}", o.usage.used, o.limit, o.usage.blocked_for.is_some()
            )),
            "admin call"
        );
        let inspected = result?;
        Ok(Response::new(InspectLimitResponse {
            limit: inspected.limit,
            used: inspected.usage.used,
            remaining: inspected.remaining(),
            blocked: inspected.usage.blocked_for.is_some(),
            block_remaining: wire_duration(inspected.usage.blocked_for.unwrap_or_default()),
            reset_after: wire_duration(inspected.usage.reset_after),
        }))
    }

    async fn reset_limit(
        &self,
        request: Request<ResetLimitRequest>,
    ) -> Result<Response<ResetLimitResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.get_ref();
        let result = self
            .limiter
            .reset_limit(&request.rule, &request.subject)
            .await;
        tracing::info!(
            peer = %caller.peer(),
            client_certificate = caller.certificate.as_deref(),
            call = "ResetLimit",
            rule = ?request.rule,
            subject = ?request.subject,
            outcome = %outcome(&result, |existed| format!("existed {existed}")),
            "admin call"
        );
        Ok(Response::new(ResetLimitResponse { existed: result? }))
    }

    async fn reset_usage(
        &self,
        request: Request<ResetUsageRequest>,
    ) -> Result<Response<ResetUsageResponse>, Status> {
        let caller = Caller::of(&request);
        let request = request.get_ref();
        let result = self
            .limiter
            .reset_usage(&request.user_id, &request.character_id)
            .await;
        tracing::info!(
            peer = %caller.peer(),
            client_certificate = caller.certificate.as_deref(),
            call = "ResetUsage",
            user_id = ?request.user_id,
            character_id = ?request.character_id,
            outcome = %outcome(&result, |conversations| format!("conversations {conversations}")),
            "admin call"
        );
        Ok(Response::new(ResetUsageResponse {
            conversations: result?,
        }))
    }
}

/// The subject of a DER certificate as `CN=..., O=...` (attributes in the
/// certificate's order), or `None` when it does not parse. A few lines of
/// DER walking rather than an X.509 crate: only the subject is read, for a
/// log line; the TLS layer has verified the certificate already.
pub fn certificate_subject(der: &[u8]) -> Option<String> {
    let (certificate, _) = element(der, 0x30)?;
    let (tbs, _) = element(certificate, 0x30)?;
    let mut rest = tbs;
    // The version, [0] EXPLICIT, is optional.
    if rest.first() == Some(&0xa0) {
        rest = any(rest)?.1;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        rest = any(rest)?.1;
    }
    let (mut name, _) = element(rest, 0x30)?;
    let mut parts = Vec::new();
    while !name.is_empty() {
        let (mut set, after) = element(name, 0x31)?;
        name = after;
        while !set.is_empty() {
            let (attribute, after) = element(set, 0x30)?;
            set = after;
            let (oid, value) = element(attribute, 0x06)?;
            let (tag, value, _) = tlv(value)?;
            let value = match tag {
                // UTF8String, PrintableString, T61String, IA5String.
                0x0c | 0x13 | 0x14 | 0x16 => String::from_utf8_lossy(value).into_owned(),
                _ => value.iter().fold("#".to_owned(), |mut hex, byte| {
                    hex.push_str(&format!("{byte:02x}"));
                    hex
                }),
            };
            parts.push(format!("{}={value}", attribute_name(oid)?));
        }
    }
    Some(parts.join(", "))
}

/// The short name of a distinguished-name attribute, else its dotted OID.
fn attribute_name(oid: &[u8]) -> Option<String> {
    let (&first, rest) = oid.split_first()?;
    let mut arcs = vec![u64::from(first / 40), u64::from(first % 40)];
    let mut arc: u64 = 0;
    for &byte in rest {
        arc = arc.checked_mul(128)? | u64::from(byte & 0x7f);
        if byte & 0x80 == 0 {
            arcs.push(arc);
            arc = 0;
        }
    }
    let dotted = arcs
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".");
    let short = match dotted.as_str() {
        "2.5.4.3" => "CN",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.2.840.113549.1.9.1" => "emailAddress",
        _ => return Some(dotted),
    };
    Some(short.to_owned())
}

/// One DER element: its tag, its contents and what follows it.
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let bytes = usize::from(first & 0x7f);
        if bytes == 0 || bytes > 4 || rest.len() < bytes {
            return None;
        }
        let len = rest[..bytes]
            .iter()
            .fold(0usize, |len, &byte| (len << 8) | usize::from(byte));
        (len, &rest[bytes..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// One DER element that must carry `tag`: its contents and what follows.
fn element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (found, contents, rest) = tlv(input)?;
    (found == tag).then_some((contents, rest))
}

/// One DER element of any tag: its contents and what follows.
fn any(input: &[u8]) -> Option<(&[u8], &[u8])> {
    tlv(input).map(|(_, contents, rest)| (contents, rest))
}

#[cfg(test)]
mod tests {
    use rcgen::{CertificateParams, DnType, KeyPair};

    use super::certificate_subject;

    #[test]
    fn the_subject_of_a_certificate_is_read_in_order() {
        let mut params =
            CertificateParams::new(vec!["client.test".to_owned()]).expect("valid names");
        params
            .distinguished_name
            .push(DnType::CommonName, "support-desk");
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Example Ltd");
        let key = KeyPair::generate().expect("rcgen generates a key");
        let cert = params.self_signed(&key).expect("rcgen self-signs");
        assert_eq!(
            certificate_subject(cert.der()).as_deref(),
            Some("CN=support-desk, O=Example Ltd")
        );
    }

    #[test]
    fn garbage_is_no_subject_and_no_panic() {
        for der in [
            &[][..],
            &[0x30],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x02, 0x30, 0x00],
        ] {
            assert_eq!(certificate_subject(der), None);
        }
    }
}
