//! PC legacy devices: the serial console, the i8042 (for reset) and vmrun's status port.

pub mod i8042;
pub mod serial;
pub mod status;

pub use i8042::I8042;
pub use serial::{Console, ConsoleTail, SerialConsole};
pub use status::{ProbePort, StatusPort};
