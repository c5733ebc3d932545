pub mod bench;
pub mod demo;
pub mod export;
pub mod network;
pub mod node;
pub mod peers;
pub mod predict;
pub mod slots;
pub mod train;

/// A multi-threaded tokio runtime for one command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}
