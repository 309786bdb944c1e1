"""Generation from the policy: Diverse Beam Search, and sampling with every rank kept in the collectives."""
