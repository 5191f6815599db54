//! `weir-bench bare`: the smallest passthrough relay on weir's own runtime
//! and socket setup, the floor every report shows beside weir. It reads the
//! client's first bytes, connects to the one upstream, writes them, and
//! copies both ways until both sides have finished, as weir's copy relay
//! does: a buffer only while a socket has data, FIN passed on at EOF, the
//! sockets closed whole at the end. No routing, no limits, no timeouts, no
//! metrics, no log line: whatever weir spends beyond this is its own work.
//!
//! The runtime is built as `weir run` builds it (multi-thread, worker count
//! from `TOKIO_WORKER_THREADS`, `event_interval(4)`), the listener is bound
//! as weir binds it, and sockets get the same options (`TCP_NODELAY` on the
//! accepted socket, a fresh `TcpSocket` connected to the upstream).

use std::io;
use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// Bytes per read, as in weir's copy relay.
const BUFFER_SIZE: usize = 16 * 1024;

/// Runs the relay until killed.
pub fn run(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .event_interval(4)
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (client, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(_) => continue,
            };
            let _ = client.set_nodelay(true);
            tokio::spawn(async move {
                let _ = serve(client, upstream).await;
            });
        }
    })
}

async fn serve(client: TcpStream, upstream: SocketAddr) -> io::Result<()> {
    // The first bytes (a ClientHello), read before the upstream is dialled
    // as a router that routes by them must.
    let mut first = Vec::with_capacity(BUFFER_SIZE);
    loop {
        client.readable().await?;
        match client.try_read_buf(&mut first) {
            Ok(0) => return Ok(()),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    let socket = if upstream.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    let mut server = socket.connect(upstream).await?;
    server.write_all(&first).await?;
    drop(first);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    tokio::try_join!(
        pump(&mut client_read, &mut server_write),
        pump(&mut server_read, &mut client_write),
    )?;
    drop(client_read.reunite(client_write));
    drop(server_read.reunite(server_write));
    Ok(())
}

/// One direction until EOF, then FIN.
async fn pump(reader: &mut OwnedReadHalf, writer: &mut OwnedWriteHalf) -> io::Result<()> {
    loop {
        reader.readable().await?;
        let mut buf = Vec::with_capacity(BUFFER_SIZE);
        loop {
            buf.clear();
            match reader.try_read_buf(&mut buf) {
                Ok(0) => return writer.shutdown().await,
                Ok(n) => writer.write_all(&buf[..n]).await?,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}
