//! The subcommands' bodies: each reads its flags, calls the library and prints for a person or
//! a script. Part of the binary only; the work itself is the library's.

mod check_kernels;
mod data;
mod eval;
mod output;
pub mod setup;
mod train;

pub use check_kernels::check_kernels;
pub use data::data;
pub use eval::eval;
pub use output::stderr;
pub use train::train;
