// A bare local chain: the tests deploy fedagg's Vyper-compiled contract themselves.
module.exports = {
  networks: { hardhat: { chainId: 31337, mining: { auto: true }, accounts: { count: 40 } } },
};
