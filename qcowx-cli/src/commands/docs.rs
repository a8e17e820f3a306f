//! Shell completions and man pages, generated from the command line's definition.

use std::io::Write;

use clap::CommandFactory;

use super::{usage_error, Failure};
use crate::{Cli, CompletionsArgs, ManArgs};

pub(crate) fn completions(a: &CompletionsArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let mut buf = Vec::new();
    clap_complete::generate(a.shell, &mut Cli::command(), "qcowx", &mut buf);
    out.write_all(&buf)?;
    Ok(0)
}

pub(crate) fn man(a: &ManArgs, out: &mut dyn Write) -> Result<u8, Failure> {
    let cmd = Cli::command();
    let page = match &a.command {
        None => cmd,
        Some(name) => match cmd.find_subcommand(name) {
            Some(sub) => sub
                .clone()
                .display_name(format!("qcowx-{name}"))
                .bin_name(format!("qcowx {name}")),
            None => usage_error(
                "man",
                clap::error::ErrorKind::InvalidValue,
                format!("'{name}' is not a qcowx command; `qcowx --help` lists them"),
            ),
        },
    };
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).render(&mut buf)?;
    out.write_all(&buf)?;
    Ok(0)
}
