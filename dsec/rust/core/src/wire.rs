//! The control protocol between the host and the in-sandbox init: length-prefixed frames
//! (`u32` little-endian length, then the body), bodies encoded field by field.

use std::io::{self, Read, Write};

/// Largest frame accepted (stdin data and written files travel in one frame).
pub const MAX_FRAME: usize = 1 << 31;

/// Appends fields to a frame body.
#[derive(Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// A body starting with the message tag.
    pub fn new(tag: u8) -> Self {
        Enc(vec![tag])
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub fn i64(&mut self, v: i64) -> &mut Self {
        self.u64(v as u64)
    }
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64);
        self.0.extend_from_slice(v);
        self
    }
    pub fn list(&mut self, v: &[Vec<u8>]) -> &mut Self {
        self.u32(v.len() as u32);
        for x in v {
            self.bytes(x);
        }
        self
    }
    pub fn opt_bytes(&mut self, v: Option<&[u8]>) -> &mut Self {
        match v {
            None => self.u8(0),
            Some(b) => self.u8(1).bytes(b),
        }
    }
}

/// Reads fields from a frame body; every read is bounds-checked.
pub struct Dec<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn short() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "truncated frame")
}

impl<'a> Dec<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Dec { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> io::Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or_else(short)?;
        let s = self.buf.get(self.pos..end).ok_or_else(short)?;
        self.pos = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u32(&mut self) -> io::Result<u32> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    pub fn u64(&mut self) -> io::Result<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    pub fn i64(&mut self) -> io::Result<i64> {
        Ok(self.u64()? as i64)
    }
    pub fn bytes(&mut self) -> io::Result<Vec<u8>> {
        let n = usize::try_from(self.u64()?).map_err(|_| short())?;
        Ok(self.take(n)?.to_vec())
    }
    pub fn list(&mut self) -> io::Result<Vec<Vec<u8>>> {
        let n = self.u32()? as usize;
        let mut v = Vec::with_capacity(n.min(4096));
        for _ in 0..n {
            v.push(self.bytes()?);
        }
        Ok(v)
    }
    pub fn opt_bytes(&mut self) -> io::Result<Option<Vec<u8>>> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.bytes()?),
        })
    }
}

/// Writes one frame.
pub fn write_frame<W: Write>(w: &mut W, body: &[u8]) -> io::Result<()> {
    if body.len() > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    let mut head = (body.len() as u32).to_le_bytes().to_vec();
    if body.len() < 4096 {
        head.extend_from_slice(body);
        return w.write_all(&head);
    }
    w.write_all(&head)?;
    w.write_all(body)
}

/// Reads one frame; `Ok(None)` on a clean end of stream.
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut head[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(short()),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let n = u32::from_le_bytes(head) as usize;
    if n > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut body = vec![0u8; n];
    r.read_exact(&mut body)?;
    Ok(Some(body))
}

/// Message tags.
pub mod tag {
    pub const CONFIG: u8 = 1;
    pub const EXEC: u8 = 2;
    pub const PYTHON: u8 = 3;
    pub const READ: u8 = 4;
    pub const WRITE: u8 = 5;
    /// Cancels the call in flight (sent by the host while it waits; never answered).
    pub const CANCEL: u8 = 6;
    /// Starts a background process; answered by OK with its id (u32).
    pub const SPAWN: u8 = 7;
    /// Polls, reads or kills a background process (`init::procs::op`); answered by PROC.
    pub const PROC_OP: u8 = 8;
    /// Resets the sandbox for a new user (`init::reset`); answered by OK.
    pub const RESET: u8 = 9;
    pub const READY: u8 = 0x81;
    pub const RESULT: u8 = 0x82;
    pub const DATA: u8 = 0x83;
    pub const OK: u8 = 0x84;
    pub const PROC: u8 = 0x85;
    pub const ERROR: u8 = 0x8f;
}

/// Error kinds carried by an `ERROR` frame.
pub mod errkind {
    pub const SETUP: u8 = 1;
    pub const PATH: u8 = 2;
    pub const POLICY: u8 = 3;
    pub const SANDBOX: u8 = 4;
}

/// Encodes an error frame body.
pub fn error_body(kind: u8, msg: &str) -> Vec<u8> {
    let mut e = Enc::new(tag::ERROR);
    e.u8(kind).bytes(msg.as_bytes());
    e.0
}

/// Decodes an error frame body (after the tag) into the crate error.
pub fn decode_error(d: &mut Dec<'_>) -> crate::Error {
    let kind = d.u8().unwrap_or(errkind::SANDBOX);
    let msg = d
        .bytes()
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default();
    match kind {
        errkind::SETUP => crate::Error::Setup(msg),
        errkind::PATH => crate::Error::Path(msg),
        errkind::POLICY => crate::Error::Policy(msg),
        _ => crate::Error::Sandbox(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_fields_and_frames() {
        let mut e = Enc::new(7);
        e.u32(5)
            .u64(1 << 40)
            .bytes(b"abc")
            .list(&[b"x".to_vec(), vec![]]);
        e.opt_bytes(None).opt_bytes(Some(b"zz"));
        let mut wire = Vec::new();
        write_frame(&mut wire, &e.0).unwrap();
        let body = read_frame(&mut wire.as_slice()).unwrap().unwrap();
        let mut d = Dec::new(&body);
        assert_eq!(d.u8().unwrap(), 7);
        assert_eq!(d.u32().unwrap(), 5);
        assert_eq!(d.u64().unwrap(), 1 << 40);
        assert_eq!(d.bytes().unwrap(), b"abc");
        assert_eq!(d.list().unwrap(), vec![b"x".to_vec(), vec![]]);
        assert_eq!(d.opt_bytes().unwrap(), None);
        assert_eq!(d.opt_bytes().unwrap(), Some(b"zz".to_vec()));
        assert!(d.u8().is_err());
    }

    #[test]
    fn truncated_frames_are_errors() {
        assert!(read_frame(&mut [1u8, 0].as_slice()).is_err());
        assert!(read_frame(&mut [].as_slice()).unwrap().is_none());
        let mut d = Dec::new(&[9, 0, 0, 0, 0, 0, 0, 0]);
        assert!(d.bytes().is_err());
    }
}
