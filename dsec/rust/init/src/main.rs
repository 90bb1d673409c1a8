//! The dsec sandbox init. Started by the host with the control socket on fd 0; see
//! `dsec_core::init` for the process structure.

fn main() {
    std::process::exit(dsec_core::init::main());
}
