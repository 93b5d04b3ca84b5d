//! A server process the tests run (an S3, Azure Blob Storage or Kafka server): started on a free
//! loopback port with its output in a log file, waited for until it listens, and killed when
//! dropped or, at the latest, when this process exits.

use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

pub(crate) struct ServerProcess {
    pub port: u16,
    child: Child,
}

impl ServerProcess {
    /// Starts `command(port)` with its output in `<dir>/<name>.log` and waits up to `wait`
    /// for it to listen on the port.
    pub fn start(
        name: &str,
        dir: &Path,
        wait: Duration,
        command: impl FnOnce(u16) -> Command,
    ) -> Result<ServerProcess, String> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        Self::start_on(name, dir, port, wait, || command(port))
    }

    /// Starts `command()`, which listens on `port` (and maybe on others it was given).
    pub fn start_on(
        name: &str,
        dir: &Path,
        port: u16,
        wait: Duration,
        command: impl FnOnce() -> Command,
    ) -> Result<ServerProcess, String> {
        let log_path = dir.join(format!("{name}.log"));
        let log =
            std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let child = command()
            .stdout(log)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        kill_at_exit(&child);
        let mut server = ServerProcess { port, child };
        let deadline = Instant::now() + wait;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = server.child.try_wait() {
                return Err(format!(
                    "{name} exited ({status}); see {}",
                    log_path.display()
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{name} did not listen on {port} within {wait:?}; see {}",
                    log_path.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(server)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        reaped(&self.child);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Servers to kill when this process exits.
static AT_EXIT: Mutex<Vec<i32>> = Mutex::new(Vec::new());

/// Kills `child` when this process exits, if nothing did before: a test binary keeps its
/// servers in statics, which are never dropped.
fn kill_at_exit(child: &Child) {
    static HOOK: Once = Once::new();
    extern "C" fn kill_all() {
        for &pid in AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            // SAFETY: kill(2) on a child this process started and has not reaped.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        AT_EXIT.lock().unwrap_or_else(|e| e.into_inner()).push(pid);
    }
    // SAFETY: registers a plain function with no captured state.
    HOOK.call_once(|| unsafe {
        libc::atexit(kill_all);
    });
}

/// Takes `child` off the exit list before it is reaped (its pid may be reused after).
fn reaped(child: &Child) {
    let pid = i32::try_from(child.id()).unwrap_or(-1);
    AT_EXIT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|&p| p != pid);
}
