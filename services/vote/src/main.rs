//! `vote`: the vote service binary. Configuration is documented in the README.

fn main() -> std::process::ExitCode {
    shared::service::main_with(vote_service::SERVICE, vote_service::DEFAULT_PORT, vote_service::build)
}
