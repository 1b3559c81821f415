//! A pg_queue consumer for NOTIFY queues, with tokio-postgres.
//!
//!     cargo run -- --dsn "host=/var/run/postgresql dbname=app" --queue emails
//!
//! It LISTENs on the queue's channel, claims one job at a time, keeps its lease alive from
//! a heartbeat task while `handle` works, then completes or fails it. A lost connection is
//! retried with backoff (a job whose completion was lost comes back after its lease:
//! delivery is at-least-once, so make `handle` idempotent). SIGTERM or Ctrl-C: stop
//! claiming, finish the job in hand, exit.

use futures_util::{stream, StreamExt};
use serde_json::{json, Value};
use std::{sync::Arc, time::Duration};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use uuid::Uuid;

struct Args {
    dsn: String,
    queue: String,
    name: String,
    lease: f64,
    poll: f64,
}

/// The work. This one sleeps `payload["sleep"]` seconds and fails when `payload["fail"]`
/// is true. Its Ok value is kept as the job's result.
async fn handle(payload: &Value) -> Result<Value, String> {
    let secs = payload.get("sleep").and_then(Value::as_f64).unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    if payload.get("fail").and_then(Value::as_bool) == Some(true) {
        return Err("payload asked to fail".into());
    }
    Ok(json!({ "done_by": std::process::id() }))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}\nusage: pg_queue_consumer --dsn DSN --queue QUEUE [--name NAME] [--lease SECS] [--poll SECS]");
            std::process::exit(2);
        }
    };
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        let _ = stop_tx.send(true);
    });

    let mut delay = Duration::from_millis(100);
    while !*stop.borrow() {
        match run(&args, stop.clone()).await {
            Ok(()) => delay = Duration::from_millis(100),
            Err(e) => {
                eprintln!(
                    "{}: connection lost ({e}); reconnecting in {delay:?}",
                    args.name
                );
                let mut stop = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.changed() => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    eprintln!("{}: stopped", args.name);
}

/// One connection's life: LISTEN, then claim and work until stopped or an error.
async fn run(args: &Args, mut stop: watch::Receiver<bool>) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = tokio_postgres::connect(&args.dsn, NoTls).await?;
    // The connection task forwards notifications; it ends (dropping `woken`'s sender) when
    // the connection does.
    let (notify, mut woken) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(_) = message {
                let _ = notify.send(());
            }
        }
    });
    let client = Arc::new(client);
    let channel: String = client
        .query_one("SELECT queue.channel($1)", &[&args.queue])
        .await?
        .get(0);
    client
        .batch_execute(&format!("LISTEN \"{}\"", channel.replace('"', "\"\"")))
        .await?;
    eprintln!("{}: listening on {channel}", args.name);

    while !*stop.borrow() {
        let claimed = client
            .query(
                "SELECT id, payload, attempt, lease_token
                   FROM queue.claim($1, $2, 1, make_interval(secs => $3))",
                &[&args.queue, &args.name, &args.lease],
            )
            .await?;
        let Some(job) = claimed.first() else {
            // Sleep until a notification (a job became ready), the poll fallback, or stop.
            tokio::select! {
                _ = woken.recv() => {}
                _ = tokio::time::sleep(Duration::from_secs_f64(args.poll)) => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        let (id, payload, attempt, token): (Uuid, Value, i32, Uuid) =
            (job.get(0), job.get(1), job.get(2), job.get(3));
        work(&client, args, id, &payload, attempt, token).await?;
    }
    Ok(())
}

async fn work(
    client: &Arc<Client>,
    args: &Args,
    id: Uuid,
    payload: &Value,
    attempt: i32,
    token: Uuid,
) -> Result<(), tokio_postgres::Error> {
    // Heartbeats every third of the lease; it stops when the lease is lost (cancelled, or
    // expired and reaped), and is aborted when the work ends.
    let beat = {
        let client = Arc::clone(client);
        let every = Duration::from_secs_f64(args.lease / 3.0);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match client
                    .query_one("SELECT queue.heartbeat($1, $2)", &[&id, &token])
                    .await
                {
                    Ok(row) if row.get::<_, bool>(0) => {}
                    _ => return,
                }
            }
        })
    };
    let outcome = handle(payload).await;
    beat.abort();
    match outcome {
        Ok(result) => {
            let done: bool = client
                .query_one("SELECT queue.complete($1, $2, $3)", &[&id, &token, &result])
                .await?
                .get(0);
            // false: the lease was lost meanwhile and another consumer has the job now.
            println!(
                "{} {id} attempt {attempt}",
                if done { "completed" } else { "lost" }
            );
        }
        Err(error) => {
            let recorded: bool = client
                .query_one("SELECT queue.fail($1, $2, $3)", &[&id, &token, &error])
                .await?
                .get(0);
            println!("failed {id} attempt {attempt} recorded={recorded}");
        }
    }
    Ok(())
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        dsn: std::env::var("DATABASE_URL").unwrap_or_default(),
        queue: String::new(),
        name: format!("rust-{}", std::process::id()),
        lease: 30.0,
        poll: 5.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let secs = || value.parse::<f64>().map_err(|e| format!("{flag}: {e}"));
        match flag.as_str() {
            "--dsn" => args.dsn = value.clone(),
            "--queue" => args.queue = value.clone(),
            "--name" => args.name = value.clone(),
            "--lease" => args.lease = secs()?,
            "--poll" => args.poll = secs()?,
            _ => return Err(format!("unknown argument {flag}")),
        }
    }
    if args.queue.is_empty() {
        return Err("--queue is required".into());
    }
    Ok(args)
}
