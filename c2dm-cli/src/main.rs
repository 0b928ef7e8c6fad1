//! `c2dm`: send Android push notifications through C2DM, or run a local stand-in for it. The
//! program is [`c2dm_cli::run`].

use std::process::ExitCode;

/// glibc's allocator serialises the many small allocations that cross threads in a broadcast
/// (see docs/PERFORMANCE.md); mimalloc keeps them per thread.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    c2dm_cli::run()
}
