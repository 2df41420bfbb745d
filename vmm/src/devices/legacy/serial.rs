//! The 8250 serial console (vm-superio's UART) and what vmrun keeps of its output: the guest's
//! console goes to a terminal or log file, and its tail stays in memory so an exit can be
//! explained (kernel panic line, init error line) without re-reading anything.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;
use vmrun_protocol::cmdline::console::{INIT_ERROR, KERNEL_PANIC};

use crate::devices::IrqLine;
use crate::vstate::bus::BusDevice;

/// Bytes of console output kept for exit reports.
const TAIL_BYTES: usize = 64 * 1024;
/// Longest line remembered as a "last error" line.
const LINE_MAX: usize = 512;

#[derive(Default)]
struct TailState {
    bytes: VecDeque<u8>,
    line: Vec<u8>,
    panic_line: Option<String>,
    init_error: Option<String>,
}

/// The in-memory tail of the console, shared with whoever reports the exit.
#[derive(Clone, Default)]
pub struct ConsoleTail(Arc<Mutex<TailState>>);

impl ConsoleTail {
    fn push(&self, buf: &[u8]) {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for &b in buf {
            if s.bytes.len() == TAIL_BYTES {
                s.bytes.pop_front();
            }
            s.bytes.push_back(b);
            if b == b'\n' {
                let line = String::from_utf8_lossy(&s.line)
                    .trim_end_matches('\r')
                    .to_string();
                if line.contains(KERNEL_PANIC) && s.panic_line.is_none() {
                    s.panic_line = Some(line.clone());
                }
                if let Some(i) = line.find(INIT_ERROR) {
                    s.init_error = Some(line[i..].to_string());
                }
                s.line.clear();
            } else if s.line.len() < LINE_MAX {
                s.line.push(b);
            }
        }
    }

    /// Everything kept, lossily decoded.
    pub fn text(&self) -> String {
        let s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let (a, b) = s.bytes.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }

    /// The last `n` lines.
    pub fn last_lines(&self, n: usize) -> String {
        let text = self.text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The first kernel panic line seen.
    pub fn panic_line(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .panic_line
            .clone()
    }

    /// The last `vmrun-init: error:` line seen.
    pub fn init_error(&self) -> Option<String> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .init_error
            .clone()
    }
}

/// Where the console goes besides the tail.
pub enum ConsoleSink {
    Stdout,
    File(std::fs::File),
    None,
}

/// The UART's output writer.
pub struct Console {
    sink: ConsoleSink,
    tail: ConsoleTail,
}

impl Console {
    pub fn new(sink: ConsoleSink, tail: ConsoleTail) -> Self {
        Console { sink, tail }
    }
}

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tail.push(buf);
        // A console sink that fails (closed terminal, full disk) must not stop the guest.
        let _ = match &mut self.sink {
            ConsoleSink::Stdout => io::stdout().write_all(buf),
            ConsoleSink::File(f) => f.write_all(buf),
            ConsoleSink::None => Ok(()),
        };
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.sink {
            ConsoleSink::Stdout => io::stdout().flush(),
            ConsoleSink::File(f) => f.flush(),
            ConsoleSink::None => Ok(()),
        }
    }
}

/// COM1 on the PIO bus; its interrupt is an eventfd registered as irqfd.
pub struct SerialConsole(Serial<IrqLine, NoEvents, Console>);

/// The UART's registers and unread input, as a snapshot keeps them (vm-superio's
/// `SerialState`, which has no serde).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSaved {
    pub baud_divisor: [u8; 2],
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialConsole {
    pub fn new(irq: EventFd, console: Console) -> Self {
        SerialConsole(Serial::new(IrqLine(irq), console))
    }

    /// A UART in the state `saved` describes; `None` when it is not one a UART can be in
    /// (more unread input than its FIFO holds).
    pub fn from_saved(irq: EventFd, console: Console, saved: &SerialSaved) -> Option<Self> {
        let st = SerialState {
            baud_divisor_low: saved.baud_divisor[0],
            baud_divisor_high: saved.baud_divisor[1],
            interrupt_enable: saved.interrupt_enable,
            interrupt_identification: saved.interrupt_identification,
            line_control: saved.line_control,
            line_status: saved.line_status,
            modem_control: saved.modem_control,
            modem_status: saved.modem_status,
            scratch: saved.scratch,
            in_buffer: saved.in_buffer.clone(),
        };
        Serial::from_state(&st, IrqLine(irq), NoEvents, console)
            .ok()
            .map(SerialConsole)
    }

    pub fn save(&self) -> SerialSaved {
        let st = self.0.state();
        SerialSaved {
            baud_divisor: [st.baud_divisor_low, st.baud_divisor_high],
            interrupt_enable: st.interrupt_enable,
            interrupt_identification: st.interrupt_identification,
            line_control: st.line_control,
            line_status: st.line_status,
            modem_control: st.modem_control,
            modem_status: st.modem_status,
            scratch: st.scratch,
            in_buffer: st.in_buffer,
        }
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (&mut *data, u8::try_from(offset)) {
            ([b], Ok(off)) => *b = self.0.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([b], Ok(off)) = (data, u8::try_from(offset)) {
            if let Err(e) = self.0.write(off, *b) {
                log::debug!("serial write: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_end_and_marks() {
        let tail = ConsoleTail::default();
        let mut c = Console::new(ConsoleSink::None, tail.clone());
        c.write_all(b"booting\r\n[ 1.0] Kernel panic - not syncing: VFS\n")
            .unwrap();
        c.write_all(b"vmrun-init: error: root.overlaysize=12q: bad size\n")
            .unwrap();
        assert_eq!(
            tail.panic_line().unwrap(),
            "[ 1.0] Kernel panic - not syncing: VFS"
        );
        assert_eq!(
            tail.init_error().unwrap(),
            "vmrun-init: error: root.overlaysize=12q: bad size"
        );
        assert_eq!(
            tail.last_lines(1),
            "vmrun-init: error: root.overlaysize=12q: bad size"
        );
    }

    #[test]
    fn tail_is_bounded() {
        let tail = ConsoleTail::default();
        let mut c = Console::new(ConsoleSink::None, tail.clone());
        let junk = vec![b'x'; 3 * TAIL_BYTES];
        c.write_all(&junk).unwrap();
        c.write_all(b"\nend\n").unwrap();
        let t = tail.text();
        assert_eq!(t.len(), TAIL_BYTES);
        assert!(t.ends_with("\nend\n"));
    }

    #[test]
    fn uart_output_reaches_the_tail_and_raises_the_irq() {
        let tail = ConsoleTail::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialConsole::new(
            irq.try_clone().unwrap(),
            Console::new(ConsoleSink::None, tail.clone()),
        );
        s.write(1, &[0x02]); // IER: THR empty interrupt
        for b in b"hi\n" {
            s.write(0, &[*b]);
        }
        assert_eq!(tail.text(), "hi\n");
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0u8];
        s.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0, "transmitter empty");
    }
}
