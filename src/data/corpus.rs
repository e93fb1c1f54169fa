//! The built-in story corpus: a deterministic generator of short, simple
//! children's stories (in the style of TinyStories), written from scratch, so
//! that training can start without downloading any data set.
//!
//! A story is a small plot (a wish or a problem, help from a friend or a grown-up,
//! a happy ending, sometimes a moral) told with a vocabulary of a few hundred
//! words, recurring characters, short dialogue and past-tense narration. Plots
//! are data: lists of sentence templates (their syntax is documented on
//! `Teller::expand`) filled from a cast drawn for each story.
//!
//! Output format: each story is one line of plain ASCII; stories are separated by
//! one empty line (`"\n\n"` between stories, [`SEPARATOR`]) and the text ends
//! with a newline. Every story has 80 to 250 words.
//!
//! Determinism: the output depends only on the seed, through the module's own
//! splitmix64 generator (no dependency on any crate's value stability).
//!
//! Not here: tokenization and token files (`data::tokenizer`, `data::tokens`).

use std::io::Write;

use crate::rng::Rng;

/// What sits between two stories: the end of one line and one empty line.
pub const SEPARATOR: &str = "\n\n";

/// The fewest and most words a story may have (words split on whitespace).
pub const WORDS_PER_STORY: std::ops::RangeInclusive<usize> = 80..=250;

/// How much text to generate and from which seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CorpusConfig {
    /// Seed of the generator: the same seed gives the same bytes.
    pub seed: u64,
    /// Upper bound on the output size. Whole stories only: the output is at most
    /// `n_bytes` long and stops before the first story that would not fit (so it is
    /// within one story, under 2 KB, of `n_bytes`; empty if no story fits).
    pub n_bytes: usize,
}

/// The corpus for `cfg` as one string (see the module docs for the format).
pub fn generate(cfg: &CorpusConfig) -> String {
    let mut text = String::with_capacity(cfg.n_bytes);
    for story in within_budget(cfg) {
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&story);
        text.push('\n');
    }
    text
}

/// Write the corpus for `cfg` to `out`, story by story, and return the number of
/// bytes written: exactly the bytes of [`generate`] without holding them all.
pub fn write_stories(cfg: &CorpusConfig, out: &mut impl Write) -> std::io::Result<usize> {
    let mut written = 0;
    for story in within_budget(cfg) {
        if written > 0 {
            out.write_all(b"\n")?;
            written += 1;
        }
        out.write_all(story.as_bytes())?;
        out.write_all(b"\n")?;
        written += story.len() + 1;
    }
    Ok(written)
}

/// The stories of `cfg` that fit in `cfg.n_bytes` with their separators.
fn within_budget(cfg: &CorpusConfig) -> impl Iterator<Item = String> {
    let mut used = 0usize;
    stories(cfg.seed).map_while(move |story| {
        let cost = story.len() + if used == 0 { 1 } else { 2 };
        if used + cost > cfg.n_bytes {
            return None;
        }
        used += cost;
        Some(story)
    })
}

/// The endless sequence of stories for `seed` (each one line, no newline).
pub fn stories(seed: u64) -> Stories {
    Stories {
        rng: Rng::new(seed),
    }
}

/// Iterator over the stories of one seed; see [`stories`].
#[derive(Clone, Debug)]
pub struct Stories {
    rng: Rng,
}

impl Iterator for Stories {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            let story = tell_story(&mut self.rng);
            if WORDS_PER_STORY.contains(&story.split_whitespace().count()) {
                return Some(story);
            }
        }
    }
}

/// Story-drawing helpers on the crate's [`Rng`].
trait Draw {
    /// Uniform in `0..n` (`n` > 0).
    fn index(&mut self, n: usize) -> usize;
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T;
    /// True with probability `percent` / 100.
    fn chance(&mut self, percent: usize) -> bool;
}

impl Draw for Rng {
    fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.index(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.index(100) < percent
    }
}

// ---------------------------------------------------------------------------
// The cast: who, where, with what.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pronoun {
    He,
    She,
}

impl Pronoun {
    /// (subject, object, possessive, reflexive)
    fn forms(self) -> [&'static str; 4] {
        match self {
            Pronoun::He => ["he", "him", "his", "himself"],
            Pronoun::She => ["she", "her", "her", "herself"],
        }
    }
}

#[derive(Clone, Debug)]
struct Character {
    name: &'static str,
    /// What the character is, without article: "little girl", "old owl".
    kind: String,
    pronoun: Pronoun,
}

const GIRL_NAMES: &[&str] = &[
    "Lily", "Mia", "Sue", "Anna", "Lucy", "Amy", "Emma", "Ella", "Kim", "Sara", "Zoe", "Molly",
];
const BOY_NAMES: &[&str] = &[
    "Tom", "Ben", "Max", "Sam", "Tim", "Jack", "Leo", "Joe", "Jake", "Bob", "Timmy", "Billy",
];
const GIRL_KINDS: &[&str] = &["little girl", "girl", "happy little girl", "kind girl"];
const BOY_KINDS: &[&str] = &["little boy", "boy", "happy little boy", "brave boy"];
const ANIMALS: &[&str] = &[
    "cat", "dog", "bunny", "bear", "bird", "frog", "duck", "mouse", "owl", "elephant", "fox",
    "puppy", "kitten", "lion",
];
const ANIMAL_ADJECTIVES: &[&str] = &["little", "small", "happy", "old", "funny", "brave"];

/// A grown-up of the hero's family: (as a noun, as a name in dialogue, pronoun).
const ELDERS: &[(&str, &str, Pronoun)] = &[
    ("mom", "Mom", Pronoun::She),
    ("dad", "Dad", Pronoun::He),
    ("grandma", "Grandma", Pronoun::She),
    ("grandpa", "Grandpa", Pronoun::He),
];

const COLORS: &[&str] = &[
    "red", "blue", "yellow", "green", "pink", "orange", "purple", "white",
];
const TOYS: &[&str] = &[
    "ball",
    "toy car",
    "teddy bear",
    "doll",
    "hat",
    "toy boat",
    "truck",
    "bucket",
    "scarf",
    "toy plane",
];
const PET_NAMES: &[&str] = &["Sunny", "Pip", "Chirpy", "Tweety", "Sky"];

/// A place and the spots in it where things get lost and found.
struct Place {
    name: &'static str,
    spots: &'static [&'static str],
}

const PLACES: &[Place] = &[
    Place {
        name: "park",
        spots: &[
            "under the slide",
            "near the swings",
            "behind a big tree",
            "under a bench",
            "by the pond",
        ],
    },
    Place {
        name: "beach",
        spots: &[
            "near the water",
            "behind a big rock",
            "in the soft sand",
            "next to a sand hill",
            "under an old boat",
        ],
    },
    Place {
        name: "garden",
        spots: &[
            "under the roses",
            "behind the fence",
            "near the little pond",
            "under a bush",
            "in the flower bed",
        ],
    },
    Place {
        name: "forest",
        spots: &[
            "under a log",
            "behind a big tree",
            "near the river",
            "in the tall grass",
            "under a pile of leaves",
        ],
    },
    Place {
        name: "farm",
        spots: &[
            "in the barn",
            "behind the hay",
            "near the chickens",
            "under the old cart",
            "by the fence",
        ],
    },
    Place {
        name: "playground",
        spots: &[
            "under the slide",
            "near the swings",
            "in the sandbox",
            "behind the big wall",
            "under a bench",
        ],
    },
];

/// A kind of day and a template sentence describing it.
const WEATHER: &[(&str, &str)] = &[
    (
        "sunny",
        "[The sun was shining and the birds were singing.|The sky was blue and the sun was warm.|]",
    ),
    (
        "warm",
        "[It was a warm day, and the flowers were open.|The air was warm and soft.|]",
    ),
    (
        "windy",
        "[The wind was blowing the leaves around.|The wind was strong, and the trees were dancing.|]",
    ),
    (
        "cold",
        "[The air was cold, so {h} wore {his} warm coat.|It was cold, but the sun was out.|]",
    ),
];

fn draw_character(rng: &mut Rng, not_named: Option<&str>) -> Character {
    loop {
        let pronoun = if rng.chance(50) {
            Pronoun::She
        } else {
            Pronoun::He
        };
        let name = *rng.pick(match pronoun {
            Pronoun::She => GIRL_NAMES,
            Pronoun::He => BOY_NAMES,
        });
        let kind = if rng.chance(65) {
            rng.pick(match pronoun {
                Pronoun::She => GIRL_KINDS,
                Pronoun::He => BOY_KINDS,
            })
            .to_string()
        } else if rng.chance(70) {
            format!("{} {}", rng.pick(ANIMAL_ADJECTIVES), rng.pick(ANIMALS))
        } else {
            rng.pick(ANIMALS).to_string()
        };
        if Some(name) != not_named {
            return Character {
                name,
                kind,
                pronoun,
            };
        }
    }
}

/// Everything one story's templates may refer to.
struct Teller {
    hero: Character,
    friend: Character,
    elder: (&'static str, &'static str, Pronoun),
    color: &'static str,
    toy: &'static str,
    place: &'static Place,
    /// Three distinct spots of `place`.
    spots: [&'static str; 3],
    weather: (&'static str, &'static str),
    pet_name: &'static str,
}

impl Teller {
    fn draw(rng: &mut Rng) -> Teller {
        let hero = draw_character(rng, None);
        let friend = draw_character(rng, Some(hero.name));
        let place = rng.pick(PLACES);
        let first = rng.index(place.spots.len());
        let second = (first + 1 + rng.index(place.spots.len() - 1)) % place.spots.len();
        let third = (0..place.spots.len())
            .cycle()
            .skip(rng.index(place.spots.len()))
            .find(|&i| i != first && i != second)
            .unwrap_or(first);
        Teller {
            hero,
            friend,
            elder: *rng.pick(ELDERS),
            color: COLORS[rng.index(COLORS.len())],
            toy: TOYS[rng.index(TOYS.len())],
            place,
            spots: [place.spots[first], place.spots[second], place.spots[third]],
            weather: *rng.pick(WEATHER),
            pet_name: PET_NAMES[rng.index(PET_NAMES.len())],
        }
    }

    /// The text of one template key (lowercase form). Values may themselves be
    /// templates (the weather sentence), so the caller expands them.
    fn value(&self, key: &str) -> &str {
        let hero = self.hero.pronoun.forms();
        let friend = self.friend.pronoun.forms();
        let elder = self.elder.2.forms();
        match key {
            "h" => self.hero.name,
            "hkind" => &self.hero.kind,
            "he" => hero[0],
            "him" => hero[1],
            "his" => hero[2],
            "himself" => hero[3],
            "f" => self.friend.name,
            "fkind" => &self.friend.kind,
            "fhe" => friend[0],
            "fhim" => friend[1],
            "fhis" => friend[2],
            "elder" => self.elder.0,
            "eldername" => self.elder.1,
            "ehe" => elder[0],
            "ehim" => elder[1],
            "ehis" => elder[2],
            "color" => self.color,
            "toy" => self.toy,
            "place" => self.place.name,
            "spot1" => self.spots[0],
            "spot2" => self.spots[1],
            "spot3" => self.spots[2],
            "day" => self.weather.0,
            "weather" => self.weather.1,
            "pet" => self.pet_name,
            _ => panic!("story template uses unknown key `{key}`"),
        }
    }

    /// Expand `template` into `out`. Syntax:
    /// - `[one|two|three]`: one alternative, uniformly (may nest; may be empty);
    /// - `{key}`: a value of the cast (see [`Teller::value`]); a key starting with an
    ///   uppercase letter (`{He}`) capitalizes the value;
    /// - `{a:key}` / `{A:key}`: the value with "a" or "an" before it.
    ///
    /// Templates are constants of this module; a malformed one is a bug and panics
    /// (the unit tests expand every template).
    fn expand(&self, rng: &mut Rng, template: &str, out: &mut String) {
        let bytes = template.as_bytes();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'[' => {
                    let (alternatives, end) = split_alternatives(template, i);
                    let chosen = alternatives[rng.index(alternatives.len())];
                    self.expand(rng, chosen, out);
                    i = end + 1;
                }
                b'{' => {
                    let end = i + template[i..].find('}').expect("unclosed `{` in template");
                    self.expand_key(rng, &template[i + 1..end], out);
                    i = end + 1;
                }
                _ => {
                    let end = template[i..]
                        .find(['[', '{'])
                        .map_or(template.len(), |at| i + at);
                    out.push_str(&template[i..end]);
                    i = end;
                }
            }
        }
    }

    fn expand_key(&self, rng: &mut Rng, key: &str, out: &mut String) {
        let (article, key) = match key.split_once(':') {
            Some((article, key)) => (Some(article), key),
            None => (None, key),
        };
        let capital = key.starts_with(|c: char| c.is_ascii_uppercase());
        let lower = key.to_ascii_lowercase();
        let mut text = String::new();
        self.expand(rng, self.value(&lower), &mut text);
        let start = out.len();
        if let Some(article) = article {
            let vowel = text.starts_with(['a', 'e', 'i', 'o', 'u']);
            out.push_str(match (article, vowel) {
                ("a", false) => "a ",
                ("a", true) => "an ",
                ("A", false) => "A ",
                ("A", true) => "An ",
                _ => panic!("story template has article `{article}`, not `a` or `A`"),
            });
        }
        out.push_str(&text);
        if capital && out.len() > start {
            out[start..=start].make_ascii_uppercase();
        }
    }
}

/// The alternatives of the `[...]` opening at `open`, and the index of its `]`.
fn split_alternatives(template: &str, open: usize) -> (Vec<&str>, usize) {
    let mut depth = 0;
    let mut alternatives = Vec::new();
    let mut start = open + 1;
    for (i, byte) in template.bytes().enumerate().skip(open) {
        match byte {
            b'[' => depth += 1,
            b']' => {
                depth -= 1;
                if depth == 0 {
                    alternatives.push(&template[start..i]);
                    return (alternatives, i);
                }
            }
            b'|' if depth == 1 => {
                alternatives.push(&template[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    panic!("unclosed `[` in template: {template}")
}

// ---------------------------------------------------------------------------
// The stories. Each plot is a list of templates, one or a few sentences each;
// an element that expands to nothing is skipped.

const INTRO: &[&str] = &[
    "[Once upon a time, there was {a:hkind} named {h}.\
     |Once upon a time, in a small town, there lived {a:hkind} named {h}.\
     |There was once {a:hkind} called {h}.\
     |{h} was {a:hkind} who lived [in a little house|near a big forest|on a farm|by the sea].\
     |Once upon a time, {a:hkind} named {h} lived [in a little house|near a big forest|on a farm].]",
    "[{He} loved to [play outside|run and jump|sing songs|draw pictures|look at the clouds|play with {his} friends].\
     |{He} was [very kind|very curious|a little shy|always happy], and {he} [loved|liked] to [play outside|run and jump|sing songs|help {his} {elder}].\
     |{He} liked to [play|run|dance] [in the sun|all day|with {his} friends].\
     |]",
];

/// Introduces the friend, for plots where the friend appears early.
const MEET_FRIEND: &str = "[{He} had a [good|best] friend named {f}.\
     |{His} best friend was {f}, {a:fkind}.\
     |{f}, {a:fkind}, was {his} best friend.]";

const LOST_TOY: &[&str] = &[
    "[{He} had {a:color} {toy} that {he} loved very much.\
     |{His} favorite toy was {a:color} {toy}.\
     |{His} {elder} gave {him} {a:color} {toy} for {his} birthday, and {he} took it everywhere.\
     |{He} had {a:color} {toy}, and {he} played with it every day.]",
    "[One {day} day|One day|One morning], {h} took the {toy} to the {place}.",
    "{weather}",
    "{He} played with the {toy} [for a long time|all morning|{spot1}] and had lots of fun.",
    "[Then {he} put the {toy} down to [pick a flower|look at a little bug|watch the birds|drink some water].\
     |After a while, {he} saw a pretty butterfly and ran after it.]",
    "[When {he} came back, the {toy} was gone!\
     |But when {he} looked for the {toy}, it was not there!\
     |When {he} turned around, the {toy} was gone!]",
    "[{h} felt very sad.|{h} was sad and scared.|{h} started to cry.\
     |{h} was very sad because {he} loved the {toy} so much.]",
    r#"["Oh no! Where is my {toy}?" {he} cried.|"Where did my {toy} go?" {h} asked.|"My {toy} is lost!" {h} said.]"#,
    "[Just then, {f}, {a:fkind}, came by.|Soon, {his} friend {f} came to the {place}.|Then {f}, {a:fkind}, saw {h}.]",
    r#"["Why are you sad?" asked {f}.|"What is wrong?" {f} asked.] {h} told {fhim} about the {toy}."#,
    r#"["Don't worry. I will help you look for it," said {f}.|"Let's look for it together!" said {f}.|"I can help you!" said {f}.]"#,
    "[They looked {spot1}, but the {toy} was not there.|First they looked {spot1}. It was not there.] \
     [Then they looked {spot2}, but they did not find it.|Next, they looked {spot2}. No {toy}!]",
    "[At last, {f} saw something {color} {spot3}.|Then {h} saw something {color} {spot3}.] \
     [It was the {toy}!|It was {his} {toy}!]",
    "[{h} was so happy!|{h} jumped up and down with joy.|{h} smiled a big smile.] {He} hugged the {toy} [tight|close].",
    r#"["Thank you, {f}!" said {h}. "You are a good friend."|"Thank you for helping me," {h} said to {f}.]"#,
    "[After that, they played together until the sun went down.\
     |Then they played with the {toy} together all day.\
     |They walked home together, happy and tired.]",
    "[{h} learned that good friends help each other.\
     |From that day on, {h} always kept {his} {toy} close.\
     |From then on, {h} and {f} were best friends.|]",
];

const KITE: &[&str] = &[
    "[{His} {elder} [gave|bought] {him} a new {color} kite.|One day, {h} got a new kite. It was {color} with a long tail.]",
    "[The next morning|One day|One {day} morning], {h} and {his} {elder} went to the [park|top of the hill] to fly the kite.",
    "[The wind was strong, and the kite went up, up, up into the sky.\
     |{h} ran as fast as {he} could, and the kite flew high into the sky.]",
    r#""Look, {Eldername}! My kite is flying!" {h} [shouted|said|laughed]."#,
    "[But then the wind blew very hard.|But then a big gust of wind came.] The kite [flew into|got stuck in] a tall tree!",
    "[{h} pulled and pulled, but the kite did not come down.|{h} tried to reach it, but the tree was too tall.]",
    "[{He} felt sad and wanted to cry.|{He} was sad because {he} could not get {his} kite.]",
    r#""[Don't be sad|Don't worry]," said {his} {elder}. "[I have an idea|I know what to do]!""#,
    "[{Ehe} found a long stick and gently pushed the kite out of the tree.\
     |{Ehe} climbed up [slowly|very carefully] and got the kite down.]",
    "The kite was [fine|not broken|safe], and {h} was so happy.",
    r#""Thank you, {Eldername}!" {he} said[, and {he} gave {ehim} a big hug|]."#,
    "[After that|Then], they flew the kite [together|again] [until it was time to go home|all afternoon], \
     [but this time they stayed far away from the trees|and {h} held the string tight].",
    "[{h} learned that it is good to ask for help.|{h} learned to always be careful near trees.|]",
];

const CASTLE: &[&str] = &[
    MEET_FRIEND,
    "[One {day} day|One day|One summer morning], {h} and {f} went to the beach[ with {his} {elder}|].",
    "[They wanted to build a big sand castle.|{h} wanted to build the biggest sand castle in the world.]",
    "They [dug in the sand|carried water in a bucket] and made tall towers and a deep hole around them.",
    "[{f} found [pretty shells|small stones] to put on top.|{h} put a little flag on the top.]",
    r#""[Look at our castle!|Our castle is so big!]" said {h}. "It is the best castle ever!""#,
    "But then a big wave came[ and washed the castle away|, and the castle fell down].",
    "[{h} was very sad. {He} sat down on the sand and cried.|{h} and {f} were very sad. They wanted to go home.]",
    r#""Don't be sad," said {f}. "We can build a new one, and this time we will build it far from the water.""#,
    "[So they started again.|So they worked together again.] [They built it high up on the dry sand.|This time, they made it even bigger.]",
    "[The waves came, but they did not reach the new castle.|The new castle stayed safe all day.]",
    "[{h} and {f} laughed and danced around it.|They were so proud of their castle.]",
    "[{h} learned that when things go wrong, you can always try again.|{h} learned that it is more fun to work together.|]",
];

const SEED: &[&str] = &[
    "[One day, {h}'s {elder} gave {him} a little seed.|One spring morning, {h} found a little seed in the garden.]",
    r#""[If you plant it and give it water, it will|Plant it and give it water, and it will] grow into a [big|beautiful] flower," said {his} {elder}."#,
    "{h} dug a small hole in the garden and put the seed in it. {He} gave it some water.",
    "[The next morning|The next day], {h} ran outside to look. But there was no flower!",
    "[{h} was sad.|{h} felt sad and a little angry.] [{He} wanted the flower to grow right away.|{He} did not want to wait.]",
    r#""Why is it not growing?" {he} asked."#,
    r#"{His} {elder} smiled. "[Seeds need time to grow|Good things take time]. You must be patient and give it water every day.""#,
    "So {h} [gave the seed water every day|watered the seed every morning]. [{He} waited and waited.|Days went by.]",
    "[One morning|Then one day], {h} saw a little green plant [in the ground|where the seed was]!",
    "[Soon|After many days], the plant grew into a big {color} flower.",
    r#""Look, {Eldername}! My flower!" {h} [shouted|said] happily."#,
    "[{h} was very proud.|{h} smiled and smelled the pretty flower.]",
    "[{h} learned that good things come to those who wait.|{h} learned to be patient.|]",
];

const BIKE: &[&str] = &[
    "[{h} got a new {color} bike for {his} birthday.|{h} had a new {color} bike, but {he} did not know how to ride it.]",
    "[{He} wanted to ride it very much.|{He} wanted to ride it like the big kids.]",
    "[One day|The next morning|One {day} morning], {h} took the bike outside[ with {his} {elder}|].",
    "{He} got on the bike and pushed the pedals. But the bike [wobbled|shook], and {h} fell down!",
    "[{He} hurt {his} knee, and it was red.|{His} knee hurt, and {he} started to cry.]",
    r#""I can't do it," {he} said. "[Riding a bike|It] is too hard.""#,
    r#"{His} {elder} [came over and |]gave {him} a hug. "[Everyone falls when they learn|It is okay to fall]. Let's try again. I will hold the bike for you.""#,
    "[So {h} tried again.|{h} wiped {his} tears and got back on the bike.] {His} {elder} held the bike and ran next to {him}.",
    "[Then {his} {elder} let go, and {h} did not even know!|After a while, {his} {elder} let go.] {h} was riding all by {himself}!",
    r#""I did it! I can ride!" {h} shouted."#,
    "[{h} rode around and around [the yard|the park] with a big smile.|{He} rode all the way to the end of the street and back.]",
    "[{h} learned that if you keep trying, you can do hard things.|{h} learned to never give up.|]",
];

const CAKE: &[&str] = &[
    "[{h} had a friend named {f} who lived next door.|{His} best friend {f} lived next door.|]",
    "[One day|One morning], {h} and {his} {elder} wanted to [bake|make] a cake [for {f}'s birthday|for a special day].",
    "They needed flour, sugar, milk and eggs.",
    "But when {h} opened the [fridge|box], there were no eggs!",
    r#""Oh no! We can't make a cake without eggs," said {h}[ sadly|]."#,
    "[Then {h} had an idea.|Just then, {h} had a good idea.] {He} ran to {his} friend {f}'s house next door.",
    r#""Can we have two eggs, please?" asked {h}. "Of course!" said {f}, and {fhe} gave {him} two eggs."#,
    "{h} ran back home with the eggs. They mixed everything and put the cake in the oven.",
    "[Soon the house smelled [sweet|very good].|After a while, the cake was ready.] It was [big and soft|warm and sweet].",
    "[They gave a big piece to {f} to say thank you.|{h} shared the cake with {f} and {fhis} family.]",
    "[Everyone said it was the best cake ever.|They all ate the cake and smiled.]",
    "[{h} learned that it is good to help your neighbors.|{h} learned that sharing makes everyone happy.|]",
];

const SHARE: &[&str] = &[
    MEET_FRIEND,
    "[One {day} day|One day], {h} and {f} went to the {place} to play.",
    "{weather}",
    "[They saw {a:color} {toy} on the ground.|There was {a:color} {toy} {spot1}.] \
     [They both wanted to play with it.|{h} wanted it, and {f} wanted it too.]",
    r#""It is mine! I saw it first!" said {h}."#,
    r#""No, it is mine!" said {f}."#,
    "They pulled and pulled. [Then the {toy} fell into the mud.|Then the {toy} flew out of their hands and landed in a puddle.]",
    "[Now the {toy} was dirty, and they were both sad.|Now nobody could play with it, and they both felt bad.]",
    "[Just then, {h}'s {elder} came over.|{h}'s {elder} saw what happened and walked over.]",
    r#"{Ehe} said, "When you fight, nobody has fun. [If you share|If you take turns], you can both play.""#,
    "[{h} and {f} looked at each other.|{h} looked at {f}.] [They felt sorry.|{h} said sorry, and {f} said sorry too.]",
    "They washed the {toy} [in the pond|with water] and [took turns playing with it|played with it together].",
    "[They laughed and had so much fun.|Soon they were laughing again.]",
    "[{h} and {f} learned that sharing is better than fighting.|From that day on, they always shared their toys.|]",
];

const DARK: &[&str] = &[
    "[{h} did not like the dark.|{h} was scared of the dark.] [Every night, {he} asked {his} {elder} to leave the light on.|]",
    "[One night|One dark night], there was a big storm. \
     [The wind blew hard and the rain fell on the roof.|Thunder went boom, and the lights went out!]",
    "{h} [hid under {his} blanket|pulled {his} blanket over {his} head]. {He} was very scared.",
    r#""{Eldername}! {Eldername}!" {he} called. "I am scared!""#,
    "[{His} {elder} came in with a [little lamp|candle].|Soon {his} {elder} came into the room.]",
    r#""Don't be scared," {ehe} said. "[The storm is outside, and you are safe in here|The dark is just your room without the light].""#,
    "[{Ehe} sat on the bed and told {him} a story about a brave little [bear|bird|fish].\
     |{Ehe} sat with {him}, and they looked out the window at the rain.]",
    "[Soon {h} was not scared anymore.|After a while, {h} felt brave.] [{He} listened to the rain. It sounded like a soft song.|]",
    r#""[I am not scared now|The dark is not so bad]," said {h}."#,
    "[Then {he} closed {his} eyes and fell asleep.|Soon {he} was fast asleep.]",
    "[The next morning, the sun was shining, and {h} felt proud.|In the morning, {h} ran to tell {his} friend {f} how brave {he} was.]",
    "[{h} learned that being brave does not mean you are never scared.|]",
];

const BIRD: &[&str] = &[
    "[One {day} day|One day|One morning], {h} went to the {place} [to play|for a walk].",
    "{weather}",
    "[{He} heard a small sound {spot1}.|Suddenly, {he} heard something {spot1}.] It was a little bird [with a hurt wing|that could not fly].",
    "[The bird looked scared and sad.|The poor bird was shaking.]",
    r#""[Poor little bird|Oh no, you are hurt]," said {h}. "I will help you.""#,
    "{He} picked up the bird very [gently|carefully] and [carried|took] it home.",
    "[{His} {elder} helped {him} make a soft bed for the bird in a box.|{h} and {his} {elder} put the bird in a box with a soft blanket.]",
    "[Every day, {h} gave the bird water and [seeds|bread crumbs].|{h} took care of the bird every day.] \
     [{He} sang songs to it.|{He} named the bird {pet}.|]",
    "[After a few days|Soon|One morning], the bird's wing was [better|strong again].",
    "[{h} took the box outside and opened it.|{h} and {his} {elder} took the bird outside.] The bird flapped its wings and flew up into the sky!",
    r#"[{h} felt a little sad to say goodbye, but {he} was happy too.|{h} waved and said, "Goodbye, little bird!"]"#,
    "[Every morning after that, the bird came back to sing by {his} window.\
     |The next day, the bird came back with its friends and sang a happy song for {h}.]",
    "[{h} learned that it feels good to help others.|{h} learned that being kind is always the right thing to do.|]",
];

const GIFT: &[&str] = &[
    MEET_FRIEND,
    "[It was {his} {elder}'s birthday soon.|Tomorrow was {his} {elder}'s birthday.] {h} wanted to give {ehim} a special gift.",
    "But {h} did not have any money[ to buy a gift|]. [{He} thought and thought.|{He} did not know what to do.]",
    "[Then {he} had an idea!|Then {he} smiled. {He} had a good idea!] {He} would make a [pretty|big] card with [flowers|hearts|a sun] on it.",
    "{He} got {his} [crayons|paper and paint] and started to [draw|paint].",
    "But then {he} bumped {his} cup, and juice spilled all over the card!",
    "[The card was wet|The colors ran together], and {h} started to cry.",
    r#"[{f} came to play and saw {h} crying.|Just then, {f} knocked on the door.] "What happened?" asked {f}."#,
    "{h} showed {fhim} the wet card.",
    r#""We can make a new one together!" said {f}."#,
    r#"So they sat down and made a new card. This time, they drew [a big sun|a rainbow|many hearts] and wrote "Happy Birthday" on it."#,
    "The next day, {h} gave the card to {his} {elder}.",
    r#"{His} {elder} smiled[ a big smile| and gave {him} a hug]. "This is the best gift ever!" {ehe} said."#,
    "[{h} felt warm and happy inside.|{h} was so proud.]",
    "[{h} learned that the best gifts come from the heart.|{h} learned that a friend can help make things better.|]",
];

const RAIN: &[&str] = &[
    "[One morning|One day], {h} woke up and looked out the window. [It was raining.|Rain was falling from the gray sky.]",
    "{h} wanted to go to the {place}[ and play with {f}|], but {his} {elder} said it was too wet.",
    "[{h} was sad.|{h} frowned and sat by the window.] [{He} did not like rainy days.|]",
    r#""I have nothing to do," {he} said."#,
    r#""Let's put on our boots and coats," said {his} {elder}. "We can jump in the puddles!""#,
    "[So they put on their boots and went outside.|{h} put on {his} yellow boots and {his} red coat. Then they went outside.]",
    "{h} jumped in a big puddle. Splash! [Water went everywhere.|The water flew up high.]",
    "[{h} laughed and laughed.|{h} laughed so hard that {he} fell down.] [It was so much fun!|]",
    "[Then the rain stopped, and the sun came out.|After a while, the rain stopped.] \
     [A big rainbow was in the sky!|They saw a beautiful rainbow over the {place}.]",
    r#""Look, {Eldername}! A rainbow!" said {h}."#,
    "[{h} learned that rainy days can be fun too.|From then on, {h} was not sad when it rained.|]",
];

const PLOTS: &[&[&str]] = &[
    LOST_TOY, KITE, CASTLE, SEED, BIKE, CAKE, SHARE, DARK, BIRD, GIFT, RAIN,
];

/// One story: a fresh cast, the intro, one plot, words separated by single spaces.
fn tell_story(rng: &mut Rng) -> String {
    let teller = Teller::draw(rng);
    let plot = *rng.pick(PLOTS);
    let mut story = String::with_capacity(1200);
    let mut sentence = String::with_capacity(200);
    for template in INTRO.iter().chain(plot.iter()) {
        sentence.clear();
        teller.expand(rng, template, &mut sentence);
        // Optional parts leave stray spaces ("[A.|] B."): keep single spaces only.
        for word in sentence.split_whitespace() {
            if !story.is_empty() {
                story.push(' ');
            }
            story.push_str(word);
        }
    }
    story
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_stays_in_range_and_covers_it() {
        let mut rng = Rng::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..5000 {
            seen[rng.index(5)] += 1;
        }
        // Each bucket expects 1000; 5 sigma is about 140.
        assert!(seen.iter().all(|&n| (860..1140).contains(&n)), "{seen:?}");
    }

    #[test]
    fn template_syntax() {
        let mut rng = Rng::new(1);
        let mut teller = Teller::draw(&mut rng);
        teller.hero = Character {
            name: "Lily",
            kind: "old owl".into(),
            pronoun: Pronoun::She,
        };
        let expand = |rng: &mut Rng, template: &str| {
            let mut out = String::new();
            teller.expand(rng, template, &mut out);
            out
        };
        assert_eq!(
            expand(&mut rng, "{He} saw {a:hkind}."),
            "She saw an old owl."
        );
        assert_eq!(
            expand(&mut rng, "{A:hkind} and {his} hat"),
            "An old owl and her hat"
        );
        assert_eq!(expand(&mut rng, "[x|x|[x|x]]"), "x");
        assert_eq!(expand(&mut rng, "a[|]b"), "ab");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(expand(&mut rng, "[a|b[c|d]]"));
        }
        assert_eq!(seen.len(), 3, "{seen:?}");
    }

    /// Every alternative of every template expands without panicking (unknown key,
    /// unclosed bracket), for every pronoun: run many casts through every plot.
    #[test]
    fn every_plot_expands() {
        let mut rng = Rng::new(99);
        for plot in PLOTS {
            for _ in 0..200 {
                let teller = Teller::draw(&mut rng);
                for template in INTRO.iter().chain(plot.iter()) {
                    let mut out = String::new();
                    teller.expand(&mut rng, template, &mut out);
                    assert!(!out.contains(['[', ']', '{', '}', '|']), "{out}");
                }
            }
        }
    }
}
