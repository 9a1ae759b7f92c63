//! Platform webhooks: a job-completed event ends every lease of that job.

use super::AppRouter;
use axum::Router;

pub(super) fn routes() -> AppRouter {
    Router::new()
}
