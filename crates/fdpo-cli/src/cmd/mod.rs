//! Subcommands of the `fdpo` binary, one module each.

pub mod exact;
