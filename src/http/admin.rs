//! The admin API (DESIGN §2): list, inspect and end leases. Bearer admin token, compared as a
//! SHA-256 digest in constant time.

use super::AppRouter;
use axum::Router;

pub(super) fn routes() -> AppRouter {
    Router::new()
}
