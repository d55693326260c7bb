//! Network boot for metalgraph (DHCP, TFTP, iPXE decisions); not built yet.
