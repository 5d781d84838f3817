//! The one HTTP client every HTTP provider uses: names resolved through the
//! guard (connections go to the checked addresses only), literal addresses
//! and every redirect checked by the guard too (at most three), no proxy,
//! a connect timeout, and answers read up to a byte cap.

use crate::guard::{Guard, GuardError, GuardedResolver};
use crate::provider::{CONNECT_TIMEOUT, ProviderError, REDIRECTS_MAX};
use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone)]
pub struct GuardedHttp {
    client: reqwest::Client,
    guard: Arc<Guard>,
}

/// An upstream's answer, read whole (within the cap).
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl GuardedHttp {
    pub fn new(guard: Guard) -> GuardedHttp {
        let guard = Arc::new(guard);
        let on_redirect = guard.clone();
        let client = reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { guard: guard.clone() }))
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .redirect(reqwest::redirect::Policy::custom(move |attempt| {
                if attempt.previous().len() > REDIRECTS_MAX {
                    return attempt.error(format!("more than {REDIRECTS_MAX} redirects"));
                }
                match on_redirect.check_url(attempt.url().as_str()) {
                    Ok(_) => attempt.follow(),
                    Err(refused) => attempt.error(refused),
                }
            }))
            .user_agent(concat!("tally/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds with a static configuration");
        GuardedHttp { client, guard }
    }

    pub fn guard(&self) -> &Guard {
        &self.guard
    }

    /// A client behind the same guard that follows no redirect (a webhook
    /// receiver that redirects has failed), with `timeout` for the whole
    /// exchange.
    pub fn without_redirects(&self, timeout: Duration) -> reqwest::Client {
        reqwest::Client::builder()
            .dns_resolver(Arc::new(GuardedResolver { guard: self.guard.clone() }))
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tally-webhooks/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("the HTTP client builds with a static configuration")
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends `request` (its URL checked first) and reads the answer up to
    /// `max_bytes`, all within `timeout`.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
        timeout: Duration,
        max_bytes: u64,
    ) -> Result<Answer, ProviderError> {
        let request = request.build().map_err(|error| ProviderError::invalid("request", error.to_string()))?;
        self.guard.check_url(request.url().as_str())?;
        let exchange = async {
            let mut response = self.client.execute(request).await.map_err(transport_error)?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            if response.content_length().is_some_and(|length| length > max_bytes) {
                return Err(ProviderError::TooLarge(max_bytes));
            }
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
                if body.len() as u64 + chunk.len() as u64 > max_bytes {
                    return Err(ProviderError::TooLarge(max_bytes));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Answer { status, headers, body })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(answer) => answer,
            Err(_) => Err(ProviderError::Timeout(timeout)),
        }
    }
}

/// A transport error in the provider's terms: a refusal of the guard (at
/// lookup or on a redirect) is `target_forbidden`, whatever reqwest wraps
/// it in.
fn transport_error(error: reqwest::Error) -> ProviderError {
    let mut source = error.source();
    while let Some(cause) = source {
        if let Some(refused) = cause.downcast_ref::<GuardError>() {
            return ProviderError::from(refused.clone());
        }
        source = cause.source();
    }
    if error.is_timeout() {
        return ProviderError::Timeout(CONNECT_TIMEOUT);
    }
    if error.is_redirect() {
        return ProviderError::Unreachable("too many redirects".into());
    }
    // reqwest's message names the URL, which carries no secret (the guard
    // refuses credentials in URLs; API keys in a query go in the request,
    // and are scrubbed by the caller).
    ProviderError::Unreachable(error.without_url().to_string())
}
