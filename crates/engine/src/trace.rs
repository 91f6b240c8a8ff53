//! Tracing of the engine's path (a batch's submit → plan → each transport's share → its end),
//! through `tracing`, with a subscriber the user turns on: `TIDEWIRE_TRACE` is an `EnvFilter`
//! directive (`tidewire=debug`, `tidewire::batch=trace`, ...), `TIDEWIRE_TRACE_FORMAT=json` writes
//! one JSON object per event. Installed once per process, and only if no other subscriber is.

/// Installs the subscriber `TIDEWIRE_TRACE` asks for, once per process (a process that set its
/// own keeps it).
pub(crate) fn init_from_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let Ok(filter) = std::env::var("TIDEWIRE_TRACE") else { return };
        let filter = match tracing_subscriber::EnvFilter::try_new(filter.trim()) {
            Ok(f) => f,
            Err(e) => {
                log::warn!("TIDEWIRE_TRACE={filter:?} is not a filter ({e}); tracing stays off");
                return;
            }
        };
        let json =
            std::env::var("TIDEWIRE_TRACE_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
        use std::io::IsTerminal;
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr);
        let installed = if json { builder.json().try_init() } else { builder.try_init() };
        if let Err(e) = installed {
            log::info!("TIDEWIRE_TRACE: a tracing subscriber is already installed ({e})");
        }
    });
}
