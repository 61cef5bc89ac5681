# pragma version ~=0.4.3
"""
@title fedagg participant registry, round ledger and governance
@notice Participants register an Ed25519 signing key with a bond and stake. A round is
        keyed by (server session << 64 | round): the aggregator opens it, participants
        commit H(key | participant | update hash) up to the deadline (never after), the
        aggregator closes the window, then lists every participant that committed with its fate
        (aggregated, excluded by the rule, contradicted its commitment, refused) in
        ascending address order (batches of at most 256), and records the round: model
        hash linked to the session's previous one, the Merkle root of the listed leaves,
        the hash of the off-chain bundle. Slashing needs a recorded leaf as evidence and
        takes at most max_slash_bps per round. The policy (rule, f, DP budget, minimum
        stake, aggregator, slash cap) changes only by a stake-weighted vote plus a
        timelock. Stake leaves through an unbonding period (still slashable meanwhile),
        then is pulled by its owner. Everything emits an event.
"""

MAX_BATCH: constant(uint256) = 256
MAX_PROOF: constant(uint256) = 40
BPS: constant(uint256) = 10000

# A listed participant's fate in a round: the leaf's code.
AGGREGATED: constant(uint8) = 0  # its update is in the aggregate
EXCLUDED: constant(uint8) = 1  # accepted, then left out by the robust rule
CONTRADICTED: constant(uint8) = 2  # revealed an update whose hash is not the one it committed
REFUSED: constant(uint8) = 3  # committed, then refused for another reason, or never revealed

struct Participant:
    signing_key: bytes32
    stake: uint256  # bonded: what eligibility and votes count, and what a slash takes from first
    slashed: bool  # slashed once: it may no longer commit or vote (what is left can still leave)
    registered: bool
    unbonding: uint256  # on its way out: withdrawable from block unbond_at, slashable until then
    unbond_at: uint256

struct Policy:
    rule: String[32]  # the aggregation rule the server must run ("" : the server's own choice)
    f: uint256
    epsilon_micro: uint256  # the DP budget per round x 1e6 (0: none set)
    min_stake: uint256
    aggregator: address
    max_slash_bps: uint256  # the most one slash takes, per round, of a participant's stake

struct Proposal:
    policy: Policy
    votes: uint256  # stake that voted for it
    voting_ends: uint256  # last block to vote
    executed: bool
    cancelled: bool

struct Record:
    model_hash: bytes32
    prev_model_hash: bytes32  # the model the round started from: the session's previous record
    merkle_root: bytes32  # over the leaves keccak256(address | commitment | code)
    bundle_hash: bytes32  # keccak256 of the round's bundle manifest, published off chain
    leaves_hash: bytes32  # the contract's own hash chain over the listed leaves, in order
    listed: uint256
    aggregated: uint256

event Registered:
    participant: indexed(address)
    signing_key: bytes32
    stake: uint256

event Staked:
    participant: indexed(address)
    amount: uint256
    total: uint256

event RoundOpened:
    round_key: indexed(uint256)
    deadline: uint256

event Committed:
    round_key: indexed(uint256)
    participant: indexed(address)
    commitment: bytes32

event Listed:
    round_key: indexed(uint256)
    participants: DynArray[address, MAX_BATCH]
    codes: DynArray[uint8, MAX_BATCH]

event RoundRecorded:
    round_key: indexed(uint256)
    model_hash: bytes32
    prev_model_hash: bytes32
    merkle_root: bytes32
    bundle_hash: bytes32
    listed: uint256
    aggregated: uint256

event Slashed:
    participant: indexed(address)
    round_key: indexed(uint256)
    code: uint8
    amount: uint256

event Unbonding:
    participant: indexed(address)
    amount: uint256
    total: uint256
    withdrawable_at: uint256

event Withdrawn:
    participant: indexed(address)
    amount: uint256

event OwnerProposed:
    account: indexed(address)

event OwnerChanged:
    account: indexed(address)

event Proposed:
    proposal: indexed(uint256)
    proposer: indexed(address)
    voting_ends: uint256

event Voted:
    proposal: indexed(uint256)
    voter: indexed(address)
    weight: uint256

event PolicyChanged:
    proposal: indexed(uint256)
    rule: String[32]
    f: uint256
    aggregator: address

event Cancelled:
    proposal: indexed(uint256)

owner: public(address)  # guardian: may veto a proposal before it executes; nothing else
pending_owner: public(address)  # two steps: the owner proposes, the new owner accepts
policy: public(Policy)
registration_bond: public(uint256)  # what registering costs at least: sybils are not free
unbonding_blocks: public(uint256)  # how long stake stays slashable after its owner asks it back
voting_blocks: public(uint256)
timelock_blocks: public(uint256)  # between the end of a vote and its execution
forfeited: public(uint256)  # slashed ether, kept by the contract
total_stake: public(uint256)  # bonded stake of everyone: what a majority is counted against
participants: public(HashMap[address, Participant])
registered_count: public(uint256)  # no fixed cap: each entry is paid for by its bond
registered_at: public(HashMap[uint256, address])
vote_lock: public(HashMap[address, uint256])  # no unbonding before this block: a vote cannot be sold
proposals: public(HashMap[uint256, Proposal])
proposal_count: public(uint256)
voted: public(HashMap[uint256, HashMap[address, bool]])
commitments: public(HashMap[uint256, HashMap[address, bytes32]])
commit_count: public(HashMap[uint256, uint256])
deadline: public(HashMap[uint256, uint256])
recorded: public(HashMap[uint256, bool])
records: HashMap[uint256, Record]
last_listed: HashMap[uint256, address]  # listing goes in ascending address order: no one twice
last_model: public(HashMap[uint256, bytes32])  # session -> model hash of its latest record
slashed_in: public(HashMap[uint256, HashMap[address, bool]])


@deploy
def __init__(min_stake: uint256, aggregator: address, registration_bond: uint256, unbonding_blocks: uint256,
             voting_blocks: uint256, timelock_blocks: uint256, rule: String[32], f: uint256, max_slash_bps: uint256):
    assert registration_bond > 0, "a zero registration bond lets anyone fill the registry for free"
    assert unbonding_blocks > 0, "stake must stay slashable for a while after it is asked back"
    assert voting_blocks > 0, "a vote needs at least one block"
    assert aggregator != empty(address), "no aggregator"
    assert max_slash_bps <= BPS, "max_slash_bps above 10000"
    self.owner = msg.sender
    self.registration_bond = registration_bond
    self.unbonding_blocks = unbonding_blocks
    self.voting_blocks = voting_blocks
    self.timelock_blocks = timelock_blocks
    self.policy = Policy(rule=rule, f=f, epsilon_micro=0, min_stake=min_stake, aggregator=aggregator,
                         max_slash_bps=max_slash_bps)


# ------------------------------------------------------------------ stake
@external
@payable
def register(signing_key: bytes32):
    """Register msg.sender with its Ed25519 public key; msg.value (at least the bond) is staked."""
    assert not self.participants[msg.sender].registered, "already registered"
    assert signing_key != empty(bytes32), "empty signing key"
    assert msg.value >= self.registration_bond, "registering needs at least the registration bond"
    self.participants[msg.sender] = Participant(
        signing_key=signing_key, stake=msg.value, slashed=False, registered=True, unbonding=0, unbond_at=0
    )
    self.registered_at[self.registered_count] = msg.sender
    self.registered_count += 1
    self.total_stake += msg.value
    log Registered(participant=msg.sender, signing_key=signing_key, stake=msg.value)


@external
@payable
def stake():
    assert self.participants[msg.sender].registered, "not registered"
    self.participants[msg.sender].stake += msg.value
    self.total_stake += msg.value
    log Staked(participant=msg.sender, amount=msg.value, total=self.participants[msg.sender].stake)


@external
def unbond(amount: uint256):
    """Ask `amount` of the stake back: it stops counting at once, stays slashable for
    unbonding_blocks (a slash earned before leaving still lands), then withdraw() pays it.
    Asking again adds to the amount and restarts the period."""
    p: Participant = self.participants[msg.sender]
    assert p.registered, "not registered"
    assert amount > 0 and amount <= p.stake, "amount must be in (0, stake]"
    assert block.number >= self.vote_lock[msg.sender], "stake locked by a vote until its execution"
    p.stake -= amount
    p.unbonding += amount
    p.unbond_at = block.number + self.unbonding_blocks
    self.participants[msg.sender] = p
    self.total_stake -= amount
    log Unbonding(participant=msg.sender, amount=amount, total=p.unbonding, withdrawable_at=p.unbond_at)


@external
@nonreentrant
def withdraw():
    """Pay msg.sender its unbonded stake, once its period is over (pull payment; the state
    is cleared before the ether leaves, and the function cannot be re-entered)."""
    p: Participant = self.participants[msg.sender]
    assert p.unbonding > 0, "nothing unbonding"
    assert block.number >= p.unbond_at, "still unbonding"
    amount: uint256 = p.unbonding
    self.participants[msg.sender].unbonding = 0
    send(msg.sender, amount)
    log Withdrawn(participant=msg.sender, amount=amount)


# ------------------------------------------------------------------ rounds
@external
def open_round(round_key: uint256, deadline: uint256):
    """The aggregator opens a round: commitments are taken up to block `deadline`."""
    assert msg.sender == self.policy.aggregator, "only the aggregator"
    assert self.deadline[round_key] == 0, "round already opened"
    assert deadline >= block.number, "deadline in the past"
    self.deadline[round_key] = deadline
    log RoundOpened(round_key=round_key, deadline=deadline)


@external
def close_commits(round_key: uint256):
    """The aggregator ends the commit window now (before it reads the commitments): the deadline
    becomes the previous block, so any commitment from this block on is late."""
    assert msg.sender == self.policy.aggregator, "only the aggregator"
    assert self.deadline[round_key] != 0, "round not open"
    closed: uint256 = block.number - 1
    if closed < self.deadline[round_key]:
        self.deadline[round_key] = closed
        log RoundOpened(round_key=round_key, deadline=closed)


@external
def commit(round_key: uint256, commitment: bytes32):
    """Commit keccak256(round key | participant | update hash), once, up to the deadline: the set
    of commitments is final once the window closed."""
    p: Participant = self.participants[msg.sender]
    assert p.registered, "not registered"
    assert not p.slashed, "slashed"
    assert p.stake >= self.policy.min_stake, "stake below the minimum"
    assert self.deadline[round_key] != 0, "round not open"
    assert block.number <= self.deadline[round_key], "commit window closed"
    assert self.commitments[round_key][msg.sender] == empty(bytes32), "already committed"
    assert commitment != empty(bytes32), "empty commitment"
    self.commitments[round_key][msg.sender] = commitment
    self.commit_count[round_key] += 1
    log Committed(round_key=round_key, participant=msg.sender, commitment=commitment)


@external
def list_participants(round_key: uint256, who: DynArray[address, MAX_BATCH], codes: DynArray[uint8, MAX_BATCH]):
    """The aggregator lists participants of a closed round with their fate, in ascending address
    order over all batches (so no one twice). Each must have committed in the round."""
    assert msg.sender == self.policy.aggregator, "only the aggregator"
    assert not self.recorded[round_key], "round already recorded"
    assert self.deadline[round_key] != 0, "round not opened: it had no commit phase"
    assert block.number > self.deadline[round_key], "commit window still open"
    assert len(who) == len(codes), "one code per participant"
    last: uint256 = convert(self.last_listed[round_key], uint256)
    acc: bytes32 = self.records[round_key].leaves_hash
    aggregated: uint256 = 0
    for i: uint256 in range(len(who), bound=MAX_BATCH):
        a: address = who[i]
        code: uint8 = codes[i]
        assert convert(a, uint256) > last, "participants not in ascending order (or listed twice)"
        last = convert(a, uint256)
        c: bytes32 = self.commitments[round_key][a]
        assert c != empty(bytes32), "a listed participant did not commit"
        assert code <= REFUSED, "unknown code"
        if code <= EXCLUDED:
            aggregated += 1
        leaf: bytes32 = keccak256(concat(convert(a, bytes20), c, convert(code, bytes1)))
        acc = keccak256(concat(acc, leaf))
    self.last_listed[round_key] = convert(last, address)
    self.records[round_key].leaves_hash = acc
    self.records[round_key].listed += len(who)
    self.records[round_key].aggregated += aggregated
    log Listed(round_key=round_key, participants=who, codes=codes)


@external
def record_round(round_key: uint256, model_hash: bytes32, prev_model_hash: bytes32, merkle_root: bytes32,
                 bundle_hash: bytes32):
    """The aggregator records a round it listed in full: every participant that committed in it,
    none left out; the model must follow from the session's previous recorded model."""
    assert msg.sender == self.policy.aggregator, "only the aggregator"
    assert not self.recorded[round_key], "round already recorded"
    assert self.deadline[round_key] != 0, "round not opened: it had no commit phase"
    assert block.number > self.deadline[round_key], "commit window still open"
    assert self.records[round_key].listed == self.commit_count[round_key], "a committed participant is not listed"
    session: uint256 = round_key >> 64
    if self.last_model[session] != empty(bytes32):
        assert prev_model_hash == self.last_model[session], "the round does not start from the last recorded model"
    self.recorded[round_key] = True
    self.last_model[session] = model_hash
    r: Record = self.records[round_key]
    r.model_hash = model_hash
    r.prev_model_hash = prev_model_hash
    r.merkle_root = merkle_root
    r.bundle_hash = bundle_hash
    self.records[round_key] = r
    log RoundRecorded(round_key=round_key, model_hash=model_hash, prev_model_hash=prev_model_hash,
                      merkle_root=merkle_root, bundle_hash=bundle_hash, listed=r.listed, aggregated=r.aggregated)


@external
def slash(participant: address, round_key: uint256, code: uint8, proof: DynArray[bytes32, MAX_PROOF]):
    """The aggregator slashes with evidence: a recorded round whose Merkle root holds the leaf
    (participant, its commitment, code), with code EXCLUDED or CONTRADICTED. Once per participant
    and round, at most max_slash_bps of its stake (bonded, then unbonding); it can no longer commit."""
    assert msg.sender == self.policy.aggregator, "only the aggregator"
    assert self.policy.max_slash_bps > 0, "slashing is off (max_slash_bps is 0)"
    assert self.recorded[round_key], "no evidence: round not recorded"
    assert code == EXCLUDED or code == CONTRADICTED, "no evidence: the code is not slashable"
    assert not self.slashed_in[round_key][participant], "already slashed for this round"
    c: bytes32 = self.commitments[round_key][participant]
    assert c != empty(bytes32), "no evidence: no commitment in this round"
    h: bytes32 = keccak256(concat(convert(participant, bytes20), c, convert(code, bytes1)))
    for sibling: bytes32 in proof:
        if convert(h, uint256) <= convert(sibling, uint256):
            h = keccak256(concat(h, sibling))
        else:
            h = keccak256(concat(sibling, h))
    assert h == self.records[round_key].merkle_root, "no evidence: the leaf is not in the record of the round"
    p: Participant = self.participants[participant]
    amount: uint256 = (p.stake + p.unbonding) * self.policy.max_slash_bps // BPS
    from_stake: uint256 = min(amount, p.stake)
    p.stake -= from_stake
    p.unbonding -= amount - from_stake
    p.slashed = True
    self.participants[participant] = p
    self.total_stake -= from_stake
    self.forfeited += amount
    self.slashed_in[round_key][participant] = True
    log Slashed(participant=participant, round_key=round_key, code=code, amount=amount)


# ------------------------------------------------------------------ governance
@external
def propose(rule: String[32], f: uint256, epsilon_micro: uint256, min_stake: uint256, aggregator: address,
            max_slash_bps: uint256) -> uint256:
    """A staked participant proposes a whole new policy; returns its id."""
    p: Participant = self.participants[msg.sender]
    assert p.registered and not p.slashed and p.stake >= self.policy.min_stake, "only a staked participant"
    assert aggregator != empty(address), "no aggregator"
    assert max_slash_bps <= BPS, "max_slash_bps above 10000"
    pid: uint256 = self.proposal_count
    self.proposal_count = pid + 1
    ends: uint256 = block.number + self.voting_blocks
    self.proposals[pid] = Proposal(
        policy=Policy(rule=rule, f=f, epsilon_micro=epsilon_micro, min_stake=min_stake, aggregator=aggregator,
                      max_slash_bps=max_slash_bps),
        votes=0, voting_ends=ends, executed=False, cancelled=False)
    log Proposed(proposal=pid, proposer=msg.sender, voting_ends=ends)
    return pid


@external
def vote(proposal: uint256):
    """Vote for a proposal with the whole bonded stake; the stake cannot be unbonded before the
    proposal's execution block (one stake, one vote)."""
    assert proposal < self.proposal_count, "no such proposal"
    prop: Proposal = self.proposals[proposal]
    assert not prop.cancelled, "proposal cancelled"
    assert block.number <= prop.voting_ends, "voting is over"
    p: Participant = self.participants[msg.sender]
    assert p.registered and not p.slashed and p.stake > 0, "only a staked participant"
    assert not self.voted[proposal][msg.sender], "already voted"
    self.voted[proposal][msg.sender] = True
    self.proposals[proposal].votes += p.stake
    self.vote_lock[msg.sender] = max(self.vote_lock[msg.sender], prop.voting_ends + self.timelock_blocks + 1)
    log Voted(proposal=proposal, voter=msg.sender, weight=p.stake)


@external
def execute(proposal: uint256):
    """Anyone applies a proposal that more than half of the bonded stake voted for, once its vote
    and then its timelock are over."""
    assert proposal < self.proposal_count, "no such proposal"
    prop: Proposal = self.proposals[proposal]
    assert not prop.executed, "already executed"
    assert not prop.cancelled, "proposal cancelled"
    assert block.number > prop.voting_ends + self.timelock_blocks, "vote or timelock not over"
    assert prop.votes * 2 > self.total_stake, "no majority of the stake"
    self.proposals[proposal].executed = True
    self.policy = prop.policy
    log PolicyChanged(proposal=proposal, rule=prop.policy.rule, f=prop.policy.f, aggregator=prop.policy.aggregator)


@external
def cancel(proposal: uint256):
    """The owner (guardian) vetoes a proposal before it executes; it cannot make one pass."""
    assert msg.sender == self.owner, "only the owner"
    assert proposal < self.proposal_count, "no such proposal"
    assert not self.proposals[proposal].executed, "already executed"
    self.proposals[proposal].cancelled = True
    log Cancelled(proposal=proposal)


@external
def propose_owner(new_owner: address):
    """The owner names its successor, who takes over by accepting (a typo cannot lose the role)."""
    assert msg.sender == self.owner, "only the owner"
    self.pending_owner = new_owner
    log OwnerProposed(account=new_owner)


@external
def accept_owner():
    assert msg.sender == self.pending_owner and msg.sender != empty(address), "only the proposed owner"
    self.owner = msg.sender
    self.pending_owner = empty(address)
    log OwnerChanged(account=msg.sender)


# ------------------------------------------------------------------ views
@external
@view
def registry(who: DynArray[address, MAX_BATCH]) -> DynArray[Participant, MAX_BATCH]:
    """Batched view: the registry entries of `who`."""
    out: DynArray[Participant, MAX_BATCH] = []
    for a: address in who:
        out.append(self.participants[a])
    return out


@external
@view
def commitments_of(round_key: uint256, who: DynArray[address, MAX_BATCH]) -> DynArray[bytes32, MAX_BATCH]:
    """Batched view: the commitments of `who` in `round_key` (zero where none)."""
    out: DynArray[bytes32, MAX_BATCH] = []
    for a: address in who:
        out.append(self.commitments[round_key][a])
    return out


@external
@view
def participant_count() -> uint256:
    return self.registered_count


@external
@view
def registered_slice(start: uint256, count: uint256) -> DynArray[address, MAX_BATCH]:
    """Batched view: registered addresses [start, start + count), in registration order."""
    out: DynArray[address, MAX_BATCH] = []
    n: uint256 = self.registered_count
    for i: uint256 in range(count, bound=MAX_BATCH):
        if start + i >= n:
            break
        out.append(self.registered_at[start + i])
    return out


@external
@view
def listing(round_key: uint256) -> (uint256, address):
    """How far the listing of a round has got: participants listed, the last one (a retry goes on from it)."""
    return self.records[round_key].listed, self.last_listed[round_key]


@external
@view
def round_record(round_key: uint256) -> Record:
    assert self.recorded[round_key], "round not recorded"
    return self.records[round_key]
