//! The object stores of the clouds: `s3://`, `gs://`, `az://` (`abfs://`, `azure://`) and
//! `http(s)://`, built by object_store from the environment the way each cloud's users
//! expect, then from explicit [`StoreOptions`]; transient failures are retried with
//! backoff. They come with the `cloud` feature (on by default); a build without it (the
//! fuzz targets) opens local and memory stores only.

use std::sync::Arc;

use object_store::path::Path;
use object_store::ObjectStore;

use crate::error::{Error, Result};
use crate::store::StoreOptions;

/// The store and the prefix inside it that the cloud `uri` names.
#[cfg(feature = "cloud")]
pub(crate) fn open(uri: &str, options: &StoreOptions) -> Result<(Arc<dyn ObjectStore>, Path)> {
    use object_store::aws::AmazonS3Builder;
    use object_store::azure::MicrosoftAzureBuilder;
    use object_store::gcp::GoogleCloudStorageBuilder;
    use object_store::http::HttpBuilder;
    use object_store::ObjectStoreScheme;

    let url = url::Url::parse(uri).map_err(|e| Error::invalid(format!("invalid uri uri=`{uri}`")).with_source(e))?;
    let (scheme, prefix) = ObjectStoreScheme::parse(&url).map_err(|e| {
        let scheme = uri.split("://").next().unwrap_or_default();
        Error::invalid(format!("unsupported uri scheme `{scheme}` uri=`{uri}`")).with_source(e)
    })?;
    let built = |e: object_store::Error| Error::from_store(e, "configuring store", &format!("uri=`{uri}`"));
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::AmazonS3 => {
            let builder = configure(AmazonS3Builder::from_env().with_url(uri), options, uri, |b, k, v| {
                Ok(b.with_config(k.parse().map_err(|_| ())?, v))
            })?;
            Arc::new(builder.with_retry(retry_config()).build().map_err(built)?)
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            let builder = configure(GoogleCloudStorageBuilder::from_env().with_url(uri), options, uri, |b, k, v| {
                Ok(b.with_config(k.parse().map_err(|_| ())?, v))
            })?;
            Arc::new(builder.with_retry(retry_config()).build().map_err(built)?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            let builder = configure(MicrosoftAzureBuilder::from_env().with_url(uri), options, uri, |b, k, v| {
                Ok(b.with_config(k.parse().map_err(|_| ())?, v))
            })?;
            Arc::new(builder.with_retry(retry_config()).build().map_err(built)?)
        }
        ObjectStoreScheme::Http => {
            let base = format!("{}://{}", url.scheme(), url.authority());
            // An `http://` uri asks for plain HTTP itself (an explicit `allow_http`
            // option still overrides this).
            let plain = object_store::ClientOptions::new().with_allow_http(url.scheme() == "http");
            let builder = HttpBuilder::new().with_url(base).with_client_options(plain);
            let builder = configure(builder, options, uri, |b, k, v| Ok(b.with_config(k.parse().map_err(|_| ())?, v)))?;
            Arc::new(builder.with_retry(retry_config()).build().map_err(built)?)
        }
        _ => {
            let scheme = url.scheme();
            return Err(Error::invalid(format!("unsupported uri scheme `{scheme}` uri=`{uri}`")));
        }
    };
    Ok((store, prefix))
}

/// Without the `cloud` feature every remote URI is refused.
#[cfg(not(feature = "cloud"))]
pub(crate) fn open(uri: &str, _options: &StoreOptions) -> Result<(Arc<dyn ObjectStore>, Path)> {
    Err(Error::invalid(format!(
        "this build of Cairn opens no cloud stores (built without the `cloud` feature) uri=`{uri}`"
    )))
}

/// Retries for transient failures (5xx, timeouts, connection resets), with backoff.
#[cfg(feature = "cloud")]
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        max_retries: 8,
        retry_timeout: std::time::Duration::from_secs(120),
        ..Default::default()
    }
}

/// Applies `options` to a builder with `set`, naming an unknown key in the error.
#[cfg(feature = "cloud")]
fn configure<B>(
    mut builder: B,
    options: &StoreOptions,
    uri: &str,
    set: impl Fn(B, &str, &str) -> Result<B, ()>,
) -> Result<B>
where
    B: Clone,
{
    for (key, value) in options {
        builder = set(builder.clone(), key, value)
            .map_err(|()| Error::invalid(format!("unknown store option option=`{key}` uri=`{uri}`")))?;
    }
    Ok(builder)
}

#[cfg(all(test, feature = "cloud"))]
mod tests {
    use crate::store::{Location, StoreOptions};

    #[test]
    fn cloud_uris_resolve_to_their_bucket_prefix() {
        let opts: StoreOptions = [("aws_region".to_string(), "us-east-1".to_string())].into();
        let s3 = Location::with_options("s3://bucket/runs/job", false, &opts).unwrap();
        assert_eq!(s3.prefix().as_ref(), "runs/job");
        assert!(s3.local_dir().is_none());
        let bad: StoreOptions = [("aws_no_such_key".to_string(), "x".to_string())].into();
        let err = Location::with_options("s3://bucket/x", false, &bad).unwrap_err();
        assert!(err.to_string().contains("aws_no_such_key"), "{err}");
    }
}
