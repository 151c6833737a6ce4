-- Some mitras' auth sessions changed in Postgres (revoked, expired early, deleted): every
-- session of theirs cached here stops counting (its epoch moves on). KEYS after the mirror's:
-- the session epochs. ARGV: the mitra ids, or '*' for every mitra's.
local EPOCHS = KEYS[23]
for i = 1, #ARGV do
  redis.call('HINCRBY', EPOCHS, ARGV[i], 1)
end
return #ARGV
