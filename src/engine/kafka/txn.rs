//! What librdkafka cannot do: finish a transaction that another producer (an earlier run of
//! the job) left open. A restored exactly-once sink must commit the transactions its snapshot
//! staged and abort the ones its earlier run opened after that snapshot. Both go to the
//! transaction coordinator on the wire, as Flink's sink does it: DescribeTransactions tells
//! the producer id and epoch the transaction runs under, EndTxn with those finishes it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, DescribeTransactionsRequest, DescribeTransactionsResponse, EndTxnRequest,
    EndTxnResponse, FindCoordinatorRequest, FindCoordinatorResponse, ListTransactionsRequest,
    ListTransactionsResponse, MetadataRequest, MetadataResponse, ProducerId, RequestHeader,
    ResponseHeader, TransactionalId,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Request, StrBytes};
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(10);
/// Versions every Kafka broker from 3.0 (KIP-664) to 4.x answers.
const FIND_COORDINATOR_V: i16 = 3;
const DESCRIBE_TXN_V: i16 = 0;
const LIST_TXN_V: i16 = 0;
const END_TXN_V: i16 = 3;
const METADATA_V: i16 = 12;

/// Kafka error codes met here.
const NONE: i16 = 0;
const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
const COORDINATOR_NOT_AVAILABLE: i16 = 15;
const NOT_COORDINATOR: i16 = 16;
const CONCURRENT_TRANSACTIONS: i16 = 51;
const TRANSACTIONAL_ID_NOT_FOUND: i16 = 105;

/// A transaction as its coordinator describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transaction {
    /// `Ongoing`, `PrepareCommit`, `CompleteCommit`, `PrepareAbort`, `CompleteAbort`,
    /// `Empty`, `PrepareEpochFence`, or `NotFound` when the coordinator has no such id.
    pub state: String,
    pub producer_id: i64,
    pub producer_epoch: i16,
}

/// Talks to the brokers of `bootstrap` (`host:port[,host:port…]`).
pub struct TxnAdmin {
    bootstrap: Vec<String>,
    correlation: i32,
}

fn err(what: &str, e: impl std::fmt::Display) -> String {
    format!("kafka {what}: {e}")
}

impl TxnAdmin {
    pub fn new(bootstrap: &str) -> TxnAdmin {
        TxnAdmin {
            bootstrap: bootstrap
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect(),
            correlation: 0,
        }
    }

    /// Sends one request to `addr` and reads its response.
    fn call<R: Request>(
        &mut self,
        addr: &str,
        version: i16,
        req: &R,
    ) -> Result<R::Response, String> {
        self.correlation = self.correlation.wrapping_add(1);
        let header = RequestHeader::default()
            .with_request_api_key(R::KEY)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("sjob-txn-recovery")));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, R::header_version(version))
            .map_err(|e| err("encoding a request header", e))?;
        req.encode(&mut body, version)
            .map_err(|e| err("encoding a request", e))?;
        let target = addr
            .to_socket_addrs()
            .map_err(|e| err(&format!("resolving {addr}"), e))?
            .next()
            .ok_or_else(|| format!("kafka: {addr} resolves to no address"))?;
        let mut conn = TcpStream::connect_timeout(&target, TIMEOUT)
            .map_err(|e| err(&format!("connecting to {addr}"), e))?;
        conn.set_read_timeout(Some(TIMEOUT)).ok();
        conn.set_write_timeout(Some(TIMEOUT)).ok();
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(body.len() as i32);
        frame.extend_from_slice(&body);
        conn.write_all(&frame)
            .map_err(|e| err(&format!("writing to {addr}"), e))?;
        let mut len = [0u8; 4];
        conn.read_exact(&mut len)
            .map_err(|e| err(&format!("reading from {addr}"), e))?;
        let len = i32::from_be_bytes(len);
        if !(0..=64 << 20).contains(&len) {
            return Err(format!("kafka: {addr} sent a response of {len} bytes"));
        }
        let mut buf = vec![0u8; len as usize];
        conn.read_exact(&mut buf)
            .map_err(|e| err(&format!("reading from {addr}"), e))?;
        let mut buf = Bytes::from(buf);
        let rh = ResponseHeader::decode(&mut buf, R::Response::header_version(version))
            .map_err(|e| err("decoding a response header", e))?;
        if rh.correlation_id != self.correlation {
            return Err(format!(
                "kafka: {addr} answered request {} with {}",
                self.correlation, rh.correlation_id
            ));
        }
        let resp = R::Response::decode(&mut buf, version)
            .map_err(|e| err(&format!("decoding {:?}", ApiKey::try_from(R::KEY)), e))?;
        let _ = buf.remaining();
        Ok(resp)
    }

    /// Sends to the first bootstrap broker that answers.
    fn call_any<R: Request>(&mut self, version: i16, req: &R) -> Result<R::Response, String> {
        let mut last = String::from("kafka: no bootstrap servers");
        for addr in self.bootstrap.clone() {
            match self.call(&addr, version, req) {
                Ok(r) => return Ok(r),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Retries what the coordinator answers with "try again" for up to about 30 s.
    fn retrying<T>(
        &mut self,
        what: &str,
        mut f: impl FnMut(&mut Self) -> Result<Result<T, i16>, String>,
    ) -> Result<T, String> {
        let mut delay = Duration::from_millis(100);
        for _ in 0..40 {
            match f(self)? {
                Ok(v) => return Ok(v),
                Err(
                    COORDINATOR_LOAD_IN_PROGRESS
                    | COORDINATOR_NOT_AVAILABLE
                    | NOT_COORDINATOR
                    | CONCURRENT_TRANSACTIONS,
                ) => {
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(code) => return Err(format!("kafka {what}: error code {code}")),
            }
        }
        Err(format!(
            "kafka {what}: the coordinator kept asking to retry"
        ))
    }

    /// The broker that coordinates `txn_id`.
    fn coordinator(&mut self, txn_id: &str) -> Result<String, String> {
        let req = FindCoordinatorRequest::default()
            .with_key(StrBytes::from_string(txn_id.to_owned()))
            .with_key_type(1);
        self.retrying(&format!("finding the coordinator of {txn_id}"), |me| {
            let r: FindCoordinatorResponse = me.call_any(FIND_COORDINATOR_V, &req)?;
            Ok(if r.error_code == NONE {
                Ok(format!("{}:{}", r.host.as_str(), r.port))
            } else {
                Err(r.error_code)
            })
        })
    }

    /// The coordinator's view of `txn_id`.
    pub fn describe(&mut self, txn_id: &str) -> Result<Transaction, String> {
        let req =
            DescribeTransactionsRequest::default().with_transactional_ids(vec![TransactionalId(
                StrBytes::from_string(txn_id.to_owned()),
            )]);
        self.retrying(&format!("describing transaction {txn_id}"), |me| {
            let at = me.coordinator(txn_id)?;
            let r: DescribeTransactionsResponse = me.call(&at, DESCRIBE_TXN_V, &req)?;
            let Some(s) = r.transaction_states.into_iter().next() else {
                return Err(format!("kafka: {at} described no transaction for {txn_id}"));
            };
            Ok(match s.error_code {
                NONE => Ok(Transaction {
                    state: s.transaction_state.as_str().to_owned(),
                    producer_id: s.producer_id.0,
                    producer_epoch: s.producer_epoch,
                }),
                TRANSACTIONAL_ID_NOT_FOUND => Ok(Transaction {
                    state: "NotFound".into(),
                    producer_id: -1,
                    producer_epoch: -1,
                }),
                code => Err(code),
            })
        })
    }

    /// Commits (or aborts) the transaction `txn` describes, as its producer would.
    pub fn end(&mut self, txn_id: &str, txn: &Transaction, commit: bool) -> Result<(), String> {
        let req = EndTxnRequest::default()
            .with_transactional_id(TransactionalId(StrBytes::from_string(txn_id.to_owned())))
            .with_producer_id(ProducerId(txn.producer_id))
            .with_producer_epoch(txn.producer_epoch)
            .with_committed(commit);
        let what = if commit { "committing" } else { "aborting" };
        self.retrying(&format!("{what} transaction {txn_id}"), |me| {
            let at = me.coordinator(txn_id)?;
            let r: EndTxnResponse = me.call(&at, END_TXN_V, &req)?;
            Ok(if r.error_code == NONE {
                Ok(())
            } else {
                Err(r.error_code)
            })
        })
    }

    /// Every broker's address (transactions are spread over their coordinators).
    fn brokers(&mut self) -> Result<Vec<String>, String> {
        let req = MetadataRequest::default().with_topics(Some(Vec::new()));
        let r: MetadataResponse = self.call_any(METADATA_V, &req)?;
        Ok(r.brokers
            .iter()
            .map(|b| format!("{}:{}", b.host.as_str(), b.port))
            .collect())
    }

    /// The ids of the open (`Ongoing`) transactions whose id starts with `prefix`.
    pub fn ongoing_with_prefix(&mut self, prefix: &str) -> Result<Vec<String>, String> {
        let req = ListTransactionsRequest::default()
            .with_state_filters(vec![StrBytes::from_static_str("Ongoing")]);
        let mut ids = Vec::new();
        for broker in self.brokers()? {
            let r: ListTransactionsResponse = self.call(&broker, LIST_TXN_V, &req)?;
            if r.error_code != NONE {
                return Err(format!(
                    "kafka listing transactions at {broker}: error code {}",
                    r.error_code
                ));
            }
            ids.extend(
                r.transaction_states
                    .into_iter()
                    .map(|t| t.transactional_id.0.as_str().to_owned())
                    .filter(|id| id.starts_with(prefix)),
            );
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}
