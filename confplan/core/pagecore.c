int pagecore_abi_version(void) { return 1; }
