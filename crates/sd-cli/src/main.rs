//! The `sd` command line. Generation lands with the pipeline (issue 7).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("the `sd` command is not implemented yet: the pipeline is still being built (see README.md)")
}
