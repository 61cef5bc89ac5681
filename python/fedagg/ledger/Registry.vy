# pragma version ~=0.4.3
"""
@title fedagg participant registry and round ledger
@notice Participants register an Ed25519 signing key with a bond and stake; each
        round they commit H(round | participant | update hash) before the commit
        deadline; the aggregator records each round's outcome (model hash, Merkle
        root of the accepted participants, their scores). Stake leaves through an
        unbonding period (still slashable meanwhile), then is pulled by its owner.
        Everything emits an event.
"""

MAX_BATCH: constant(uint256) = 256

struct Participant:
    signing_key: bytes32
    stake: uint256  # bonded: what eligibility counts, and what a slash takes
    slashed: bool
    registered: bool
    unbonding: uint256  # on its way out: withdrawable from block unbond_at, slashable until then
    unbond_at: uint256

event Registered:
    participant: indexed(address)
    signing_key: bytes32
    stake: uint256

event Staked:
    participant: indexed(address)
    amount: uint256
    total: uint256

event RoundOpened:
    round_id: indexed(uint256)
    deadline: uint256

event Committed:
    round_id: indexed(uint256)
    participant: indexed(address)
    commitment: bytes32
    late: bool

event RoundRecorded:
    round_id: indexed(uint256)
    model_hash: bytes32
    merkle_root: bytes32
    accepted: uint256

event Slashed:
    participant: indexed(address)
    amount: uint256

event Unbonding:
    participant: indexed(address)
    amount: uint256
    total: uint256
    withdrawable_at: uint256

event Withdrawn:
    participant: indexed(address)
    amount: uint256

event RoleProposed:
    role: String[16]
    account: indexed(address)
    effective_at: uint256

event RoleChanged:
    role: String[16]
    account: indexed(address)

owner: public(address)
aggregator: public(address)
pending_owner: public(address)  # two steps: the owner proposes, the new owner accepts
pending_aggregator: public(address)  # the owner proposes; anyone activates it after the timelock
aggregator_at: public(uint256)  # the block from which pending_aggregator can be activated
role_timelock_blocks: public(uint256)
min_stake: public(uint256)
registration_bond: public(uint256)  # what registering costs at least: sybils are not free
unbonding_blocks: public(uint256)  # how long stake stays slashable after its owner asks it back
forfeited: public(uint256)  # slashed ether, kept by the contract
participants: public(HashMap[address, Participant])
registered_count: public(uint256)  # no fixed cap: each entry is paid for by its bond
registered_at: public(HashMap[uint256, address])
commitments: public(HashMap[uint256, HashMap[address, bytes32]])
committed_late: public(HashMap[uint256, HashMap[address, bool]])
deadline: public(HashMap[uint256, uint256])
model_hash: public(HashMap[uint256, bytes32])
merkle_root: public(HashMap[uint256, bytes32])
recorded: public(HashMap[uint256, bool])
in_record: HashMap[uint256, HashMap[address, bool]]  # round -> already listed in its record
round_accepted: HashMap[uint256, DynArray[address, MAX_BATCH]]
round_scores: HashMap[uint256, DynArray[int256, MAX_BATCH]]


@deploy
def __init__(min_stake: uint256, aggregator: address, registration_bond: uint256, unbonding_blocks: uint256,
             role_timelock_blocks: uint256):
    assert registration_bond > 0, "a zero registration bond lets anyone fill the registry for free"
    assert unbonding_blocks > 0, "stake must stay slashable for a while after it is asked back"
    assert aggregator != empty(address), "no aggregator"
    self.owner = msg.sender
    self.role_timelock_blocks = role_timelock_blocks
    self.aggregator = aggregator
    self.min_stake = min_stake
    self.registration_bond = registration_bond
    self.unbonding_blocks = unbonding_blocks


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
    log Registered(participant=msg.sender, signing_key=signing_key, stake=msg.value)


@external
@payable
def stake():
    assert self.participants[msg.sender].registered, "not registered"
    self.participants[msg.sender].stake += msg.value
    log Staked(participant=msg.sender, amount=msg.value, total=self.participants[msg.sender].stake)


@external
def unbond(amount: uint256):
    """Ask `amount` of the stake back: it stops counting at once, stays slashable for
    unbonding_blocks (a slash earned before leaving still lands), then withdraw() pays it.
    Asking again adds to the amount and restarts the period."""
    p: Participant = self.participants[msg.sender]
    assert p.registered, "not registered"
    assert not p.slashed, "slashed"
    assert amount > 0 and amount <= p.stake, "amount must be in (0, stake]"
    p.stake -= amount
    p.unbonding += amount
    p.unbond_at = block.number + self.unbonding_blocks
    self.participants[msg.sender] = p
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


@external
def propose_owner(new_owner: address):
    """The owner names its successor, who takes over by accepting (a typo cannot lose the role)."""
    assert msg.sender == self.owner, "only the owner"
    self.pending_owner = new_owner
    log RoleProposed(role="owner", account=new_owner, effective_at=block.number)


@external
def accept_owner():
    assert msg.sender == self.pending_owner and msg.sender != empty(address), "only the proposed owner"
    self.owner = msg.sender
    self.pending_owner = empty(address)
    log RoleChanged(role="owner", account=msg.sender)


@external
def propose_aggregator(new_aggregator: address):
    """The owner names a new aggregator; it takes over role_timelock_blocks later (everyone sees it
    coming on chain), once someone calls activate_aggregator."""
    assert msg.sender == self.owner, "only the owner"
    assert new_aggregator != empty(address), "no aggregator"
    self.pending_aggregator = new_aggregator
    self.aggregator_at = block.number + self.role_timelock_blocks
    log RoleProposed(role="aggregator", account=new_aggregator, effective_at=self.aggregator_at)


@external
def activate_aggregator():
    assert self.pending_aggregator != empty(address), "no aggregator proposed"
    assert block.number >= self.aggregator_at, "timelock not over"
    self.aggregator = self.pending_aggregator
    self.pending_aggregator = empty(address)
    log RoleChanged(role="aggregator", account=self.aggregator)


@external
def open_round(round_id: uint256, deadline: uint256):
    """The aggregator opens a round: commitments are taken up to block `deadline`."""
    assert msg.sender == self.aggregator, "only the aggregator"
    assert self.deadline[round_id] == 0, "round already opened"
    assert deadline >= block.number, "deadline in the past"
    self.deadline[round_id] = deadline
    log RoundOpened(round_id=round_id, deadline=deadline)


@external
def close_commits(round_id: uint256):
    """The aggregator ends the commit window now (before it reads the commitments): the deadline
    becomes the previous block, so any commitment from this block on is late."""
    assert msg.sender == self.aggregator, "only the aggregator"
    assert self.deadline[round_id] != 0, "round not open"
    closed: uint256 = block.number - 1
    if closed < self.deadline[round_id]:
        self.deadline[round_id] = closed
        log RoundOpened(round_id=round_id, deadline=closed)


@external
def commit(round_id: uint256, commitment: bytes32):
    """Commit keccak256(round | participant | update hash), once. A commitment after the
    deadline is kept but marked late, so the aggregator can name the reason it refuses it."""
    p: Participant = self.participants[msg.sender]
    assert p.registered, "not registered"
    assert not p.slashed, "slashed"
    assert p.stake >= self.min_stake, "stake below the minimum"
    assert self.deadline[round_id] != 0, "round not open"
    assert self.commitments[round_id][msg.sender] == empty(bytes32), "already committed"
    assert commitment != empty(bytes32), "empty commitment"
    late: bool = block.number > self.deadline[round_id]
    self.commitments[round_id][msg.sender] = commitment
    self.committed_late[round_id][msg.sender] = late
    log Committed(round_id=round_id, participant=msg.sender, commitment=commitment, late=late)


@external
def record_round(round_id: uint256, model_hash: bytes32, merkle_root: bytes32,
                 accepted: DynArray[address, MAX_BATCH], scores: DynArray[int256, MAX_BATCH]):
    """The aggregator records a round it ran: only one that was opened, whose commit window has
    closed, and whose every accepted participant committed in it on time, each once."""
    assert msg.sender == self.aggregator, "only the aggregator"
    assert not self.recorded[round_id], "round already recorded"
    assert len(accepted) == len(scores), "one score per accepted participant"
    assert self.deadline[round_id] != 0, "round not opened: it had no commit phase"
    assert block.number > self.deadline[round_id], "commit window still open"
    for a: address in accepted:
        assert self.commitments[round_id][a] != empty(bytes32), "an accepted participant did not commit"
        assert not self.committed_late[round_id][a], "an accepted participant committed late"
        assert not self.in_record[round_id][a], "a participant recorded twice"
        self.in_record[round_id][a] = True
    self.recorded[round_id] = True
    self.model_hash[round_id] = model_hash
    self.merkle_root[round_id] = merkle_root
    self.round_accepted[round_id] = accepted
    self.round_scores[round_id] = scores
    log RoundRecorded(round_id=round_id, model_hash=model_hash, merkle_root=merkle_root, accepted=len(accepted))


@external
def slash(participant: address):
    """The owner or the aggregator slashes a participant: its stake, unbonding included, is forfeited."""
    assert msg.sender == self.owner or msg.sender == self.aggregator, "only the owner or the aggregator"
    assert self.participants[participant].registered, "not registered"
    amount: uint256 = self.participants[participant].stake + self.participants[participant].unbonding
    self.participants[participant].slashed = True
    self.participants[participant].stake = 0
    self.participants[participant].unbonding = 0
    self.forfeited += amount
    log Slashed(participant=participant, amount=amount)


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
def commitments_of(round_id: uint256, who: DynArray[address, MAX_BATCH]) -> (DynArray[bytes32, MAX_BATCH], DynArray[bool, MAX_BATCH]):
    """Batched view: the commitments of `who` in `round_id` (zero where none) and whether each came late."""
    out: DynArray[bytes32, MAX_BATCH] = []
    late: DynArray[bool, MAX_BATCH] = []
    for a: address in who:
        out.append(self.commitments[round_id][a])
        late.append(self.committed_late[round_id][a])
    return out, late


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
def round_record(round_id: uint256) -> (bytes32, bytes32, DynArray[address, MAX_BATCH], DynArray[int256, MAX_BATCH]):
    assert self.recorded[round_id], "round not recorded"
    return self.model_hash[round_id], self.merkle_root[round_id], self.round_accepted[round_id], self.round_scores[round_id]
