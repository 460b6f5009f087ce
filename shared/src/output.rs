//! Data on stdout, for commands whose output is piped (`| head`, `| jq`).
//!
//! The processes keep Rust's default of ignoring SIGPIPE: a coordinator or
//! worker writing to a socket its peer has closed must get an error, not be
//! killed by the signal (a worker died silently that way when a network cut
//! reset its connection). So a closed stdout shows up as a `BrokenPipe`
//! error on write, which these helpers turn into a quiet, successful exit,
//! as Unix tools do. Any other write error (a full disk) ends the program
//! with a message and status 1.

use std::io::Write;

/// Writes `args` to stdout and flushes; see the module notes for errors.
pub fn write(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        // The message goes to stderr, which is still open.
        #[allow(clippy::print_stderr)]
        {
            eprintln!("error: writing to stdout: {e}");
        }
        std::process::exit(1);
    }
}

/// `print!` for data: a closed stdout ends the program quietly.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::output::write(format_args!($($arg)*))
    };
}

/// `println!` for data: a closed stdout ends the program quietly.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::output::write(format_args!("{}\n", format_args!($($arg)*)))
    };
}
