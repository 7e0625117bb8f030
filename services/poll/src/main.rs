//! `poll`: the poll service binary. Configuration is documented in the README.

fn main() -> std::process::ExitCode {
    shared::service::main_with(poll_service::SERVICE, poll_service::DEFAULT_PORT, poll_service::build)
}
